"""Dataset rows as they come in files: reading, row-format detection, validation and normalization.

Files: .jsonl, .json (a list of rows), .csv, .parquet; text files in UTF-8 (a byte order mark is skipped) or the
encoding given. Row formats, detected from the first row of a file (or set with `format`):
  chat        {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}
              (OpenAI's fine-tuning format: an assistant turn with "weight": 0 is not trained on)
  sharegpt    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}  (Axolotl, LLaMA-Factory)
  alpaca      {"instruction": "...", "input": "..." (optional), "output": "..."}
  completion  {"prompt": "...", "completion": "..."}
  text        {"text": "..."}                                   continued pretraining: loss on every token
  preference  {"prompt": "..." | messages, "chosen": "..." | messages, "rejected": "..." | messages}   (DPO)
chat, sharegpt, alpaca and completion rows become chat examples {"messages": [...]}; loss is on assistant turns
only. Every bad row is reported as `file:line: field: problem`; `on_error: skip` drops bad rows and counts why.
Used by the data and DPO stages, `ftx data` and the bench's prompt files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .errors import FtxError

ROLES = {"system", "user", "assistant"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = ("auto", "chat", "sharegpt", "alpaca", "completion", "text", "preference")
CHAT_FORMATS = ("chat", "sharegpt", "alpaca", "completion")  # rows that become conversations
# ShareGPT speakers -> roles (Axolotl's and LLaMA-Factory's tags; role/content keys are accepted too)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
ALPACA_TEMPLATE = "{instruction}\n\n{input}"


class Options(BaseModel):
    """How rows are read (the data sections of recipes, `ftx data`, bench prompt files)."""

    encoding: str = "utf-8"
    alpaca_template: str = ALPACA_TEMPLATE


class LoadReport(BaseModel):
    file: str
    format: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, int] = {}
    problems: list[str] = Field(default_factory=list, description="the first bad rows, file:line: field: problem")


class RowError(Exception):
    """A bad row: `field: problem`; `reason` is the stable category the skip summary counts."""

    def __init__(self, field: str, problem: str, reason: str | None = None):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.reason = field, problem, reason or problem


def decode(path: Path, encoding: str = "utf-8") -> str:
    """A text file's content; a UTF-8 byte order mark is skipped. A byte the encoding cannot read is one error
    naming the file, the line and the byte offset, and what to do."""
    raw = Path(path).read_bytes()
    name = encoding.lower().replace("_", "-")
    utf8 = name in ("utf-8", "utf8")
    if utf8 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise FtxError(
            "the file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8, or set "
            "data.encoding: utf-16",
            where=f"{path}:1",
        )
    if raw.startswith(b"\xef\xbb\xbf") and not name.startswith(("utf-16", "utf-32")):
        raw = raw[3:]  # a UTF-8 byte order mark: spreadsheet programs write one, whatever the text's encoding
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise FtxError(
            f"not valid {encoding}: byte 0x{raw[e.start]:02x} at offset {e.start}; save the file as UTF-8, "
            "or set data.encoding to its encoding (e.g. latin-1 or cp1252)",
            where=f"{path}:{line}",
        ) from None


def read_records(path: Path, encoding: str = "utf-8") -> list[tuple[str, Any]]:
    """(location, raw row) pairs; location is `file:line` (JSONL, CSV) or `file:row N` (JSON, Parquet).
    A row that is not even parseable is returned as a RowError in place of the row."""
    path = Path(path)
    if not path.is_file():
        raise FtxError("dataset file not found", where=str(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(decode(path, encoding).splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                err = RowError("json", f"invalid JSON ({e.msg}, column {e.colno})", "invalid JSON")
                out.append((f"{path}:{lineno}", err))
        return out
    if suffix == ".json":
        try:
            rows = json.loads(decode(path, encoding))
        except json.JSONDecodeError as e:
            raise FtxError(f"invalid JSON ({e.msg})", where=f"{path}:{e.lineno}") from None
        if not isinstance(rows, list):
            raise FtxError("a .json dataset must be a list of rows", where=str(path))
        return [(f"{path}:row {i}", r) for i, r in enumerate(rows, 1)]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(decode(path, encoding), newline=""))
        out = []
        try:
            for row in reader:
                if "messages" in row and isinstance(row["messages"], str):  # messages as a JSON string column
                    with contextlib.suppress(json.JSONDecodeError):
                        row["messages"] = json.loads(row["messages"])
                out.append((f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}))
        except csv.Error as e:
            raise FtxError(f"not a readable CSV file ({e})", where=f"{path}:{reader.line_num}") from None
        return out
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... on broken files
            raise FtxError(
                f"not a readable Parquet file ({type(e).__name__}: {str(e)[:160]})", where=str(path)
            ) from None
        return [(f"{path}:row {i}", r) for i, r in enumerate(table.to_pylist(), 1)]
    raise FtxError(f"unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}", where=str(path))


def detect(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
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
        raise RowError(
            key,
            "missing" if v is None else f"must be a string, not {type(v).__name__}",
            "missing" if v is None else "wrong type",
        )
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
        msg = {"role": m["role"], "content": m["content"]}
        if "weight" in m:  # OpenAI's fine-tuning format: 0 leaves an assistant turn out of the loss
            if m["role"] != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise RowError(
                    f"{field}[{i}].weight", "only assistant turns have a weight, and it is 0 or 1", "bad weight"
                )
            msg["weight"] = int(m["weight"])
        out.append(msg)
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            idx = i + (len(out) - len(turns))
            raise RowError(
                f"{field}[{idx}].role",
                f"turns must alternate user/assistant: expected {want}, got {m['role']}",
                "turns do not alternate",
            )
    if final_assistant:
        if not turns or out[-1]["role"] != "assistant":
            raise RowError(field, "last turn must be from the assistant")
        for i, m in enumerate(out):
            if m["role"] == "assistant" and not m["content"].strip() and m.get("weight", 1):
                raise RowError(f"{field}[{i}].content", "empty response")
        if all(m.get("weight", 1) == 0 for m in out if m["role"] == "assistant"):
            raise RowError(field, "every assistant turn has weight 0: nothing to train on")
    return out


def _sharegpt(turns: Any) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise RowError("conversations", "must be a non-empty list of {from, value}")
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"conversations[{i}]", "must be an object")
        speaker, text = t.get("from", t.get("role")), t.get("value", t.get("content"))
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise RowError(
                f"conversations[{i}].from",
                f"unknown speaker {speaker!r} (ftx trains on {', '.join(SHAREGPT_ROLES)})",
                "unknown speaker",
            )
        msgs.append({"role": role, "content": text, **({"weight": t["weight"]} if "weight" in t else {})})
    try:
        return _messages(msgs, "conversations")
    except RowError as e:  # name ShareGPT's keys, not the normalized ones
        raise RowError(e.field.replace(".role", ".from").replace(".content", ".value"), e.problem, e.reason) from None


def _side(obj: dict, key: str) -> str:
    v = obj.get(key)
    if isinstance(v, list):  # messages: the assistant reply is the last turn
        msgs = _messages(v, key)
        return msgs[-1]["content"]
    return _text(obj, key)


def normalize(obj: Any, fmt: str, options: Options | None = None) -> dict:
    """One raw row -> a normalized example; raises RowError(field, problem)."""
    options = options or Options()
    if isinstance(obj, RowError):
        raise obj
    if not isinstance(obj, dict):
        raise RowError("row", "must be an object")
    if fmt == "chat":
        return {"messages": _messages(obj.get("messages"), "messages")}
    if fmt == "sharegpt":
        return {"messages": _sharegpt(obj.get("conversations"))}
    if fmt == "alpaca":
        instruction, extra = _text(obj, "instruction"), _text(obj, "input", required=False, nonempty=False)
        user = options.alpaca_template.format(instruction=instruction, input=extra) if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj, "output")}]}
    if fmt == "completion":
        return {
            "messages": [
                {"role": "user", "content": _text(obj, "prompt")},
                {"role": "assistant", "content": _text(obj, "completion")},
            ]
        }
    if fmt == "text":
        return {"text": _text(obj, "text")}
    if fmt == "preference":
        p = obj.get("prompt")
        prompt = (
            _messages(p, "prompt", final_assistant=False)
            if isinstance(p, list)
            else [{"role": "user", "content": _text(obj, "prompt")}]
        )
        chosen, rejected = _side(obj, "chosen"), _side(obj, "rejected")
        if chosen.strip() == rejected.strip():
            raise RowError("rejected", "identical to chosen")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    raise RowError("format", f"unknown format {fmt!r}")


def load(
    path: Path, fmt: str = "auto", on_error: str = "fail", max_problems: int = 20, options: Options | None = None
) -> tuple[list[dict], LoadReport]:
    """Read and validate a dataset file. on_error='fail': the first bad row raises `file:line: field: problem`."""
    options = options or Options()
    records = read_records(path, options.encoding)
    if not records:
        raise FtxError("dataset is empty", where=str(path))
    if fmt == "auto":
        fmt = next((f for _, r in records if (f := detect(r))), None)
        if fmt is None:
            keys = sorted(records[0][1]) if isinstance(records[0][1], dict) else type(records[0][1]).__name__
            raise FtxError(
                f"cannot detect the row format from the keys {keys} (expected: messages | conversations | "
                "instruction/output | prompt/completion | text | prompt/chosen/rejected)",
                where=records[0][0],
            )
    examples, dropped, problems = [], Counter(), []
    for where, raw in records:
        try:
            examples.append(normalize(raw, fmt, options))
        except RowError as e:
            if on_error == "fail":
                raise FtxError(str(e), where=where) from None
            dropped[f"{e.field.split('[')[0]}: {e.reason}"] += 1
            if len(problems) < max_problems:
                problems.append(f"{where}: {e}")
    if not examples:
        raise FtxError(f"no valid rows ({sum(dropped.values())} dropped; first: {problems[0]})", where=str(path))
    return examples, LoadReport(
        file=str(path),
        format=fmt,
        rows_read=len(records),
        rows_kept=len(examples),
        dropped=dict(dropped),
        problems=problems,
    )


def load_rows(path: Path, options: Options | None = None) -> list[list[dict]]:
    """Chat conversations of a file (chat, sharegpt, alpaca or completion rows); any bad row raises."""
    examples, report = load(path, options=options)
    if report.format not in CHAT_FORMATS:
        raise FtxError(f"expected chat conversations, found {report.format} rows", where=str(path))
    return [e["messages"] for e in examples]
