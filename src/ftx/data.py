"""Data stage: read, validate, normalize, dedupe and split training data; render it with the chat template.

Files: .jsonl, .json (a list of rows), .csv, .parquet. Row formats, detected from the first row of a file
(or set with `data.format`):
  chat        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  alpaca      {"instruction": "...", "input": "..." (optional), "output": "..."}
  completion  {"prompt": "...", "completion": "..."}
  text        {"text": "..."}                                   continued pretraining: loss on every token
  preference  {"prompt": "..." | messages, "chosen": "..." | messages, "rejected": "..." | messages}   (DPO)
chat, alpaca and completion rows become chat examples {"messages": [...]}; loss is on assistant turns only.
Every bad row is reported as `file:line: field: problem`; `on_error: skip` drops bad rows and counts why.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import FtxError

ROLES = {"system", "user", "assistant"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path = Field(description="training data (.jsonl, .json, .csv, .parquet)")
    heldout: Path | None = Field(None, description="prompts never trained on, for base vs fine-tuned comparison")
    format: Literal["auto", "chat", "alpaca", "completion", "text", "preference"] = "auto"
    on_error: Literal["fail", "skip"] = Field("fail", description="a bad row stops the run, or is dropped and counted")
    dedupe: bool = Field(True, description="drop exact and whitespace/case-normalized duplicate rows")
    near_dup_threshold: float | None = Field(0.9, gt=0, le=1, description="an evaluation row whose prompt has at "
                                             "least this Jaccard similarity (word 3-grams) to an earlier split's "
                                             "prompt is removed as leakage; null turns it off")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    max_seq_len: int = Field(512, ge=16)


class LoadReport(BaseModel):
    file: str
    format: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, int] = {}
    problems: list[str] = Field(default_factory=list, description="the first bad rows, file:line: field: problem")


class DataResult(BaseModel):
    format: str
    train_rows: int
    val_rows: int
    test_rows: int
    heldout_rows: int
    duplicates_removed: dict[str, int]
    leakage_removed: int
    near_duplicates_removed: int = 0
    load: list[LoadReport]
    train_file: str
    val_file: str
    test_file: str | None
    heldout_file: str | None


class RowError(Exception):
    """A bad row: `field: problem`; `reason` is the stable category the skip summary counts."""

    def __init__(self, field: str, problem: str, reason: str | None = None):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.reason = field, problem, reason or problem


# ------------------------------------------------------------------------------------------- reading

def read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, raw row) pairs; location is `file:line` (JSONL, CSV) or `file:row N` (JSON, Parquet).
    A row that is not even parseable is returned as a RowError in place of the row."""
    path = Path(path)
    if not path.is_file():
        raise FtxError("dataset file not found", where=str(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((f"{path}:{lineno}", RowError("json", f"invalid JSON ({e.msg}, column {e.colno})", "invalid JSON")))
        return out
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FtxError(f"invalid JSON ({e.msg})", where=f"{path}:{e.lineno}") from None
        if not isinstance(rows, list):
            raise FtxError("a .json dataset must be a list of rows", where=str(path))
        return [(f"{path}:row {i}", r) for i, r in enumerate(rows, 1)]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            out = []
            for row in reader:
                if "messages" in row and isinstance(row["messages"], str):  # messages as a JSON string column
                    try:
                        row["messages"] = json.loads(row["messages"])
                    except json.JSONDecodeError:
                        pass
                out.append((f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}))
            return out
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}:row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    raise FtxError(f"unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}", where=str(path))


def detect(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "chat"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "completion"
    if "text" in obj:
        return "text"
    return None


def _text(obj: dict, key: str, *, required: bool = True, nonempty: bool = True) -> str:
    v = obj.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        raise RowError(key, "missing" if v is None else f"must be a string, not {type(v).__name__}",
                       "missing" if v is None else "wrong type")
    if nonempty and not v.strip():
        raise RowError(key, "empty")
    return v


def _messages(msgs: Any, field: str, *, final_assistant: bool = True) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise RowError(field, "must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"{field}[{i}]", "must be an object")
        if m.get("role") not in ROLES:
            raise RowError(f"{field}[{i}].role", f"unknown role {m.get('role')!r}", "unknown role")
        if not isinstance(m.get("content"), str):
            raise RowError(f"{field}[{i}].content", "must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            idx = i + (len(out) - len(turns))
            raise RowError(f"{field}[{idx}].role", f"turns must alternate user/assistant: expected {want}, got {m['role']}",
                           "turns do not alternate")
    if final_assistant:
        if not turns or out[-1]["role"] != "assistant":
            raise RowError(field, "last turn must be from the assistant")
        for i, m in enumerate(out):
            if m["role"] == "assistant" and not m["content"].strip():
                raise RowError(f"{field}[{i}].content", "empty response")
    return out


def _side(obj: dict, key: str) -> str:
    v = obj.get(key)
    if isinstance(v, list):  # messages: the assistant reply is the last turn
        msgs = _messages(v, key)
        return msgs[-1]["content"]
    return _text(obj, key)


def normalize(obj: Any, fmt: str) -> dict:
    """One raw row -> a normalized example; raises RowError(field, problem)."""
    if isinstance(obj, RowError):
        raise obj
    if not isinstance(obj, dict):
        raise RowError("row", "must be an object")
    if fmt == "chat":
        return {"messages": _messages(obj.get("messages"), "messages")}
    if fmt == "alpaca":
        instruction, extra = _text(obj, "instruction"), _text(obj, "input", required=False, nonempty=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj, "output")}]}
    if fmt == "completion":
        return {"messages": [{"role": "user", "content": _text(obj, "prompt")},
                             {"role": "assistant", "content": _text(obj, "completion")}]}
    if fmt == "text":
        return {"text": _text(obj, "text")}
    if fmt == "preference":
        p = obj.get("prompt")
        prompt = (_messages(p, "prompt", final_assistant=False) if isinstance(p, list)
                  else [{"role": "user", "content": _text(obj, "prompt")}])
        chosen, rejected = _side(obj, "chosen"), _side(obj, "rejected")
        if chosen.strip() == rejected.strip():
            raise RowError("rejected", "identical to chosen")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    raise RowError("format", f"unknown format {fmt!r}")


def load(path: Path, fmt: str = "auto", on_error: str = "fail", max_problems: int = 20) -> tuple[list[dict], LoadReport]:
    """Read and validate a dataset file. on_error='fail': the first bad row raises `file:line: field: problem`."""
    records = read_records(path)
    if not records:
        raise FtxError("dataset is empty", where=str(path))
    if fmt == "auto":
        fmt = next((f for _, r in records if (f := detect(r))), None)
        if fmt is None:
            raise FtxError("cannot detect the row format (expected keys: messages | instruction/output | "
                           "prompt/completion | text | prompt/chosen/rejected)", where=records[0][0])
    examples, dropped, problems = [], Counter(), []
    for where, raw in records:
        try:
            examples.append(normalize(raw, fmt))
        except RowError as e:
            if on_error == "fail":
                raise FtxError(str(e), where=where) from None
            dropped[f"{e.field.split('[')[0]}: {e.reason}"] += 1
            if len(problems) < max_problems:
                problems.append(f"{where}: {e}")
    if not examples:
        raise FtxError(f"no valid rows ({sum(dropped.values())} dropped; first: {problems[0]})", where=str(path))
    return examples, LoadReport(file=str(path), format=fmt, rows_read=len(records), rows_kept=len(examples),
                                dropped=dict(dropped), problems=problems)


def load_rows(path: Path) -> list[list[dict]]:
    """Chat conversations of a file (chat, alpaca or completion rows); any bad row raises."""
    examples, report = load(path)
    if report.format not in ("chat", "alpaca", "completion"):
        raise FtxError(f"expected chat conversations, found {report.format} rows", where=str(path))
    return [e["messages"] for e in examples]


# ------------------------------------------------------------------------------------------- dedupe and split

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
    val, test = sorted(idx[:n_val]), sorted(idx[n_val:n_val + n_test])
    train = sorted(idx[n_val + n_test:])
    return [rows[i] for i in train], [rows[i] for i in val], [rows[i] for i in test]


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of a normalized text (the whole text when it is shorter than n words)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


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


def remove_leakage(train: list[dict], *others: list[dict], near_dup_threshold: float | None = None
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


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def prepare(cfg: DataConfig) -> tuple[dict[str, list[dict]], dict]:
    """Load, validate, dedupe, split and leakage-check; returns the splits and the facts for the report."""
    examples, report = load(cfg.path, cfg.format, cfg.on_error)
    reports = [report]
    dups = {"exact": 0, "normalized": 0}
    if cfg.dedupe:
        examples, dups = dedupe(examples)
    train, val, test = split(examples, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    heldout = []
    if cfg.heldout:
        heldout, held_report = load(cfg.heldout, cfg.format, cfg.on_error)
        reports.append(held_report)
    (val, test, heldout), leaked, near = remove_leakage(train, val, test, heldout,
                                                        near_dup_threshold=cfg.near_dup_threshold)
    if not val:
        raise FtxError("every validation row duplicates a training prompt", where=str(cfg.path))
    splits = {"train": train, "val": val, "test": test, "heldout": heldout}
    return splits, {"format": report.format, "duplicates_removed": dups, "leakage_removed": leaked,
                    "near_duplicates_removed": near, "load": reports}


def run(cfg: DataConfig, out: Path) -> DataResult:
    """Validate everything first, then write the splits into `out` (already a temp dir)."""
    return write(*prepare(cfg), out)


def write(splits: dict[str, list[dict]], facts: dict, out: Path) -> DataResult:
    """Write prepared splits into `out` (already a temp dir)."""
    for name, rows in splits.items():
        if rows or name in ("train", "val"):
            write_jsonl(out / f"{name}.jsonl", rows)
    return DataResult(
        train_rows=len(splits["train"]), val_rows=len(splits["val"]), test_rows=len(splits["test"]),
        heldout_rows=len(splits["heldout"]), train_file="train.jsonl", val_file="val.jsonl",
        test_file="test.jsonl" if splits["test"] else None,
        heldout_file="heldout.jsonl" if splits["heldout"] else None, **facts,
    )


def read_examples(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def read_split(path: Path) -> list[list[dict]]:
    """Chat conversations of a split file written by `run`."""
    return [ex["messages"] for ex in read_examples(path) if "messages" in ex]


# ------------------------------------------------------------------------------------------- rendering

def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def render(tokenizer, messages: list[dict], max_seq_len: int) -> dict:
    """Token ids of a conversation and labels that train on every assistant turn and nothing else.

    For each assistant turn i, the conversation before it is rendered with `add_generation_prompt=True`
    and the conversation up to and including it without; the tokens between the two are that turn's reply
    (with its end-of-turn token). The chat template must render each shorter conversation as a prefix of the
    longer one, otherwise the mask would be wrong; that is checked.
    """
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    labels = [-100] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = prompt_ids(tokenizer, messages[:i])
        upto = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        if full[: len(before)] != before or full[: len(upto)] != upto:
            raise FtxError("chat template does not render each turn as a prefix of the conversation")
        labels[len(before) : len(upto)] = full[len(before) : len(upto)]
    return {"input_ids": full[:max_seq_len], "labels": labels[:max_seq_len]}


def render_example(tokenizer, ex: dict, max_seq_len: int) -> dict:
    """A normalized example -> input_ids/labels. Chat: assistant turns only; text: every token."""
    if "messages" in ex:
        return render(tokenizer, ex["messages"], max_seq_len)
    if "text" in ex:
        ids = _ids(tokenizer(ex["text"], add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids = ids[:max_seq_len]
        return {"input_ids": ids, "labels": list(ids)}
    raise FtxError("preference rows train with DPO, which the train stage does not run yet")


# ------------------------------------------------------------------------------------------- inspect

def inspect(examples: list[dict], tokenizer, max_seq_len: int) -> dict:
    """Token lengths (with the model's template), share over max_seq_len, trained tokens, turn/role counts."""
    import numpy as np

    lengths, trained, roles, turns = [], [], Counter(), []
    for ex in examples:
        if "prompt" in ex:  # preference rows: prompt + chosen reply
            ex = {"messages": ex["prompt"] + [{"role": "assistant", "content": ex["chosen"]}]}
        r = render_example(tokenizer, ex, 1 << 30)
        lengths.append(len(r["input_ids"]))
        trained.append(sum(x != -100 for x in r["labels"][:max_seq_len]))
        if "messages" in ex:
            roles.update(m["role"] for m in ex["messages"])
            turns.append(sum(m["role"] == "assistant" for m in ex["messages"]))
    arr = np.asarray(lengths)
    return {
        "rows": len(examples), "tokens_total": int(arr.sum()), "trained_tokens": int(sum(trained)),
        "length": {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
                   "max": int(arr.max())},
        "max_seq_len": max_seq_len, "truncated_share": float((arr > max_seq_len).mean()),
        "roles": dict(roles), "assistant_turns": {"mean": float(np.mean(turns)), "max": int(max(turns))} if turns else None,
        "lengths": lengths,
    }


def plot_lengths(lengths: list[int], max_seq_len: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(lengths, bins=min(50, max(10, len(set(lengths)))), color="#4477aa")
    ax.axvline(max_seq_len, color="#cc3311", ls="--", label=f"max_seq_len {max_seq_len}")
    ax.set_xlabel("tokens per row (chat template applied)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
