"""From validated rows to training splits: exact and normalized dedupe, a seeded train/val/test split, and the
removal of evaluation prompts that leak across splits (exactly, or as near duplicates: MinHash LSH from
datasketch finds candidates, exact Jaccard on word 3-grams decides). Shared by the data and DPO stages."""

from __future__ import annotations

import json
import random
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import InputFile
from .errors import FtxError
from .rows import ALPACA_TEMPLATE, FORMATS, Options, load


class DataSource(BaseModel):
    """A dataset file and how to split it (the recipe's `data:` section, and `dpo.data:`)."""

    model_config = ConfigDict(extra="forbid")
    path: InputFile = Field(description="the dataset (.jsonl, .json, .csv, .parquet), relative to the recipe")
    heldout: InputFile | None = Field(None, description="prompts never trained on, for base vs fine-tuned comparison")
    format: Literal[FORMATS] = Field("auto", description="row format; auto: detected from the first row")
    encoding: str = Field(
        "utf-8",
        description="the files' text encoding (utf-8 skips a byte order mark; e.g. "
        "latin-1, cp1252, utf-16 for files that cannot be re-saved)",
    )
    alpaca_template: str = Field(
        ALPACA_TEMPLATE,
        description="alpaca rows: the user turn when `input` is not "
        "empty, from {instruction} and {input} (when it is empty: the instruction alone)",
    )
    on_error: Literal["fail", "skip"] = Field("fail", description="a bad row stops the run, or is dropped and counted")
    dedupe: bool = Field(True, description="drop exact and whitespace/case-normalized duplicate rows")
    near_dup_threshold: float | None = Field(
        0.9,
        gt=0,
        le=1,
        description="an evaluation row whose prompt has at "
        "least this Jaccard similarity (word 3-grams) to an earlier split's "
        "prompt is removed as leakage; null turns it off",
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of rows held out for validation")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="share of rows held out as a test split")
    seed: int = Field(0, description="seed of the split")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None
        return v

    @field_validator("alpaca_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        if "{instruction}" not in v or "{input}" not in v:
            raise ValueError("must contain {instruction} and {input}")
        try:
            v.format(instruction="", input="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"not a valid template ({e}); write literal braces as {{{{ }}}}") from None
        return v

    def options(self) -> Options:
        return Options(encoding=self.encoding, alpaca_template=self.alpaca_template)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _norm_all(obj: Any) -> Any:
    if isinstance(obj, str):
        return _norm(obj)
    if isinstance(obj, list):
        return [_norm_all(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _norm_all(v) for k, v in obj.items()}
    return obj


def example_key(ex: dict, normalized: bool = False) -> str:
    return json.dumps(_norm_all(ex) if normalized else ex, sort_keys=True, ensure_ascii=False)


def prompt_key(ex: dict) -> str:
    """What a model sees before answering: leakage across splits is judged on this."""
    if "messages" in ex:
        return json.dumps(_norm_all(ex["messages"][:-1]), ensure_ascii=False)
    if "prompt" in ex:
        return json.dumps(_norm_all(ex["prompt"]), ensure_ascii=False)
    return _norm(ex["text"])


def prompt_text(ex: dict) -> str:
    """The prompt as plain text (contents only, no JSON syntax): near-duplicates are judged on this."""
    msgs = ex["messages"][:-1] if "messages" in ex else ex.get("prompt")
    return " ".join(m["content"] for m in msgs) if msgs is not None else ex["text"]


def dedupe(examples: list[dict]) -> tuple[list[dict], dict[str, int]]:
    seen_exact, seen_norm, out = set(), set(), []
    counts = {"exact": 0, "normalized": 0}
    for ex in examples:
        exact, norm = example_key(ex), example_key(ex, normalized=True)
        if exact in seen_exact:
            counts["exact"] += 1
        elif norm in seen_norm:
            counts["normalized"] += 1
        else:
            out.append(ex)
        seen_exact.add(exact)
        seen_norm.add(norm)
    return out, counts


def split(rows: list, val_fraction: float, test_fraction: float = 0.0, seed: int = 0) -> tuple[list, list, list]:
    """Seeded shuffle into train/val/test (order inside each split follows the input)."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(len(rows) * val_fraction))
    n_test = round(len(rows) * test_fraction)
    if n_val + n_test >= len(rows):
        raise FtxError(f"{len(rows)} rows are too few for val_fraction={val_fraction}, test_fraction={test_fraction}")
    val, test = sorted(idx[:n_val]), sorted(idx[n_val : n_val + n_test])
    train = sorted(idx[n_val + n_test :])
    return [rows[i] for i in train], [rows[i] for i in val], [rows[i] for i in test]


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of a normalized text (the whole text when it is shorter than n words)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDupIndex:
    """Near-duplicate lookup: MinHash LSH (datasketch) finds candidates, exact Jaccard on shingles decides."""

    def __init__(self, threshold: float, num_perm: int = 128):
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm, self._minhash = threshold, num_perm, MinHash
        # LSH is tuned a little below the threshold so candidates near it are not missed; exact Jaccard filters
        self.lsh = MinHashLSH(threshold=max(0.05, threshold - 0.1), num_perm=num_perm)
        self.sets: dict[int, set[str]] = {}

    def _hash(self, sh: set[str]):
        m = self._minhash(num_perm=self.num_perm)
        m.update_batch([s.encode() for s in sh])
        return m

    def add(self, text: str) -> None:
        sh = shingles(text)
        key = len(self.sets)
        self.sets[key] = sh
        self.lsh.insert(key, self._hash(sh))

    def match(self, text: str) -> float:
        """The highest Jaccard similarity to an indexed text at or above the threshold (0.0 if none)."""
        sh = shingles(text)
        best = max((jaccard(sh, self.sets[k]) for k in self.lsh.query(self._hash(sh))), default=0.0)
        return best if best >= self.threshold else 0.0


def remove_leakage(
    train: list[dict], *others: list[dict], near_dup_threshold: float | None = None
) -> tuple[list[list[dict]], int, int]:
    """Drop evaluation rows whose prompt also occurs in train or an earlier evaluation split: exactly (after
    whitespace/case normalization) or, with a threshold, as a near duplicate. Returns the kept splits and the
    counts of exact and near-duplicate removals."""
    seen = {prompt_key(ex) for ex in train}
    index = NearDupIndex(near_dup_threshold) if near_dup_threshold else None
    if index:
        for ex in train:
            index.add(prompt_text(ex))
    kept, exact, near = [], 0, 0
    for rows in others:
        out = []
        for ex in rows:
            k = prompt_key(ex)
            if k in seen:
                exact += 1
            elif index and index.match(prompt_text(ex)):
                near += 1
            else:
                out.append(ex)
                seen.add(k)
                if index:
                    index.add(prompt_text(ex))
        kept.append(out)
    return kept, exact, near


def prepare(cfg: DataSource) -> tuple[dict[str, list[dict]], dict]:
    """Load, validate, dedupe, split and leakage-check; returns the splits and the facts for the report."""
    examples, report = load(cfg.path, cfg.format, cfg.on_error, options=cfg.options())
    reports = [report]
    dups = {"exact": 0, "normalized": 0}
    if cfg.dedupe:
        examples, dups = dedupe(examples)
    train, val, test = split(examples, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    heldout = []
    if cfg.heldout:
        heldout, held_report = load(cfg.heldout, cfg.format, cfg.on_error, options=cfg.options())
        reports.append(held_report)
    (val, test, heldout), leaked, near = remove_leakage(
        train, val, test, heldout, near_dup_threshold=cfg.near_dup_threshold
    )
    if not val:
        raise FtxError("every validation row duplicates a training prompt", where=str(cfg.path))
    splits = {"train": train, "val": val, "test": test, "heldout": heldout}
    return splits, {
        "format": report.format,
        "duplicates_removed": dups,
        "leakage_removed": leaked,
        "near_duplicates_removed": near,
        "load": reports,
    }
