"""Data stage: load and validate chat data, split it, render it with the model's chat template.

Accepted rows (JSONL, one object per line):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   chat (last turn: assistant)
  {"prompt": "...", "completion": "..."}                                        prompt/completion
Both are normalized to chat messages. Loss is computed on the final assistant turn only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import FtxError

ROLES = {"system", "user", "assistant"}


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path = Field(description="training data, JSONL")
    heldout: Path | None = Field(None, description="prompts never trained on, for base vs fine-tuned comparison")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    max_seq_len: int = Field(512, ge=16)


class DataResult(BaseModel):
    train_rows: int
    val_rows: int
    heldout_rows: int
    train_file: str
    val_file: str
    heldout_file: str | None


def _normalize(obj: Any, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise FtxError("row must be a JSON object", where=where)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise FtxError("messages: must be a non-empty list", where=where)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise FtxError(f"messages[{i}]: must be an object", where=where)
            if m.get("role") not in ROLES:
                raise FtxError(f"messages[{i}].role: unknown role {m.get('role')!r}", where=where)
            if not isinstance(m.get("content"), str):
                raise FtxError(f"messages[{i}].content: must be a string", where=where)
        if msgs[-1]["role"] != "assistant":
            raise FtxError("messages: last turn must be from the assistant", where=where)
        if not msgs[-1]["content"].strip():
            raise FtxError("messages[-1].content: empty response", where=where)
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise FtxError(f"{key}: missing or not a string", where=where)
        if not obj["completion"].strip():
            raise FtxError("completion: empty response", where=where)
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise FtxError("unknown row format: expected 'messages' or 'prompt'/'completion'", where=where)


def load_rows(path: Path) -> list[list[dict]]:
    """Parse a JSONL file into chat message lists; the first bad line raises `file:line: field: problem`."""
    path = Path(path)
    if not path.is_file():
        raise FtxError("dataset file not found", where=str(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FtxError(f"invalid JSON ({e.msg} at column {e.colno})", where=where) from None
            rows.append(_normalize(obj, where))
    if not rows:
        raise FtxError("dataset is empty", where=str(path))
    return rows


def split(rows: list, val_fraction: float, seed: int) -> tuple[list, list]:
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(len(rows) * val_fraction))
    val = [rows[i] for i in sorted(idx[:n_val])]
    train = [rows[i] for i in sorted(idx[n_val:])]
    return train, val


def _write_jsonl(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for msgs in rows:
            f.write(json.dumps({"messages": msgs}) + "\n")


def run(cfg: DataConfig, out: Path) -> DataResult:
    """Validate everything first, then write train/val/heldout splits into `out` (already a temp dir)."""
    rows = load_rows(cfg.path)
    heldout = load_rows(cfg.heldout) if cfg.heldout else []
    train, val = split(rows, cfg.val_fraction, cfg.seed)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "val.jsonl", val)
    if heldout:
        _write_jsonl(out / "heldout.jsonl", heldout)
    return DataResult(
        train_rows=len(train), val_rows=len(val), heldout_rows=len(heldout),
        train_file="train.jsonl", val_file="val.jsonl", heldout_file="heldout.jsonl" if heldout else None,
    )


def read_split(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in open(path, encoding="utf-8") if line.strip()]


def render(tokenizer, messages: list[dict], max_seq_len: int) -> dict:
    """Token ids for a conversation and labels that train on the final assistant turn only.

    The prompt is everything before the final turn rendered with `add_generation_prompt=True`; the chat
    template must reproduce it as a prefix of the full conversation, otherwise the mask would be wrong.
    """
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True)
    prompt_ids, full_ids = _ids(prompt_ids), _ids(full_ids)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise FtxError("chat template does not render the prompt as a prefix of the conversation")
    full_ids = full_ids[:max_seq_len]
    labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
    return {"input_ids": full_ids, "labels": labels}


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
