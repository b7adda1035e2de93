"""Data stage: read, validate, normalize, dedupe and split the recipe's training data (ftx.core.rows, ftx.core.splits)
into train/val/test (+ held-out) JSONL files, which every later stage reads. `ftx data inspect` uses
`inspect` and `plot_lengths` below."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.chat import render_example, write_jsonl
from ..core.config import InputFile
from ..core.rows import ALPACA_TEMPLATE, FORMATS, LoadReport
from ..core.splits import DataSource, prepare
from ..stage import Stage


class DataConfig(DataSource):
    max_seq_len: int = Field(
        512,
        ge=16,
        description="tokens per training row (longer rows are truncated); also the Modelfile's default context",
    )


class RowsJob(BaseModel):
    """How `ftx data` reads files (the same settings as a recipe's `data:` section)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal[FORMATS] = Field("auto", description="row format; auto: detected from the first row")
    encoding: str = Field("utf-8", description="the files' text encoding")
    alpaca_template: str = Field(
        ALPACA_TEMPLATE, description="alpaca rows: the user turn from {instruction} and {input}"
    )

    def options(self):
        from ..core.rows import Options

        return Options(encoding=self.encoding, alpaca_template=self.alpaca_template)


class ValidateJob(RowsJob):
    files: list[InputFile] = Field(min_length=1, description="dataset files (.jsonl, .json, .csv, .parquet)")
    on_error: Literal["fail", "skip"] = Field(
        "skip", description="skip: report every bad row and the drop counts; fail: stop at the first"
    )


class SplitJob(DataSource):
    out: Path = Field(description="directory for train/val/test.jsonl and report.json")


class ConvertJob(RowsJob):
    path: InputFile = Field(description="a dataset file of chat-like rows (chat, sharegpt, alpaca, completion)")
    to: Literal["chat"] = Field("chat", description="the format to write")
    out: Path = Field(description="the converted JSONL file")


class InspectJob(RowsJob):
    path: InputFile = Field(description="a dataset file")
    base_model: str = Field("smollm2-135m-instruct", description="whose tokenizer and chat template")
    max_seq_len: int = Field(512, ge=16, description="the training sequence length to compare against")
    png: Path | None = Field(None, description="write a token-length histogram here")
    examples: int = Field(2, ge=0, description="rendered rows to show")


def convert(job: ConvertJob) -> int:
    """`ftx data convert`: rows in any chat-like format -> chat rows ({"messages": [...]}, weights kept)."""
    from ..core.cache import atomic_write_text
    from ..core.errors import FtxError
    from ..core.rows import CHAT_FORMATS, load

    examples, report = load(job.path, job.format, "fail", options=job.options())
    if report.format not in CHAT_FORMATS:
        raise FtxError(
            f"{report.format} rows are not conversations; --to chat converts {', '.join(CHAT_FORMATS)} rows",
            where=str(job.path),
        )
    import json

    atomic_write_text(job.out, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    return len(examples)


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


def run(cfg: DataSource, out: Path) -> DataResult:
    """Validate everything first, then write the splits into `out` (already a temp dir)."""
    return write(*prepare(cfg), out)


def write(splits: dict[str, list[dict]], facts: dict, out: Path) -> DataResult:
    """Write prepared splits into `out` (already a temp dir)."""
    for name, rows in splits.items():
        if rows or name in ("train", "val"):
            write_jsonl(out / f"{name}.jsonl", rows)
    return DataResult(
        train_rows=len(splits["train"]),
        val_rows=len(splits["val"]),
        test_rows=len(splits["test"]),
        heldout_rows=len(splits["heldout"]),
        train_file="train.jsonl",
        val_file="val.jsonl",
        test_file="test.jsonl" if splits["test"] else None,
        heldout_file="heldout.jsonl" if splits["heldout"] else None,
        **facts,
    )


class Data(Stage):
    name = "data"
    config = DataConfig
    result = DataResult

    def prepare(self, ctx):
        return prepare(ctx.cfg)  # bad data fails here, before anything is written

    def run(self, ctx, out: Path) -> DataResult:
        return write(*ctx.prepared, out)

    def headline(self, r: dict) -> str:
        return f"{r['train_rows']} train / {r['val_rows']} val / {r['heldout_rows']} held-out rows"


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
        "rows": len(examples),
        "tokens_total": int(arr.sum()),
        "trained_tokens": int(sum(trained)),
        "length": {
            "mean": float(arr.mean()),
            "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)),
            "max": int(arr.max()),
        },
        "max_seq_len": max_seq_len,
        "truncated_share": float((arr > max_seq_len).mean()),
        "roles": dict(roles),
        "assistant_turns": {"mean": float(np.mean(turns)), "max": int(max(turns))} if turns else None,
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


def show(job, console) -> None:
    """`ftx data inspect`: the table of `inspect`, rendered rows and the length histogram."""
    from rich.table import Table
    from transformers import AutoTokenizer

    from ..core import basemodel
    from ..core.rows import load

    examples, report = load(job.path, job.format, "fail", options=job.options())
    tok = AutoTokenizer.from_pretrained(basemodel.resolve(job.base_model))
    st = inspect(examples, tok, job.max_seq_len)
    table = Table(title=f"{job.path} ({report.format}, {st['rows']} rows)")
    table.add_column("measure")
    table.add_column("value")
    ln = st["length"]
    table.add_row(
        "tokens per row", f"mean {ln['mean']:.1f} · p50 {ln['p50']:.0f} · p95 {ln['p95']:.0f} · max {ln['max']}"
    )
    table.add_row("tokens (all / trained)", f"{st['tokens_total']} / {st['trained_tokens']}")
    table.add_row(f"rows over max_seq_len {job.max_seq_len}", f"{100 * st['truncated_share']:.1f}%")
    if st["roles"]:
        table.add_row("messages by role", ", ".join(f"{k} {v}" for k, v in st["roles"].items()))
        table.add_row(
            "assistant turns per row", f"mean {st['assistant_turns']['mean']:.2f} · max {st['assistant_turns']['max']}"
        )
    console.print(table)
    for ex in examples[: job.examples]:
        msgs = ex.get("messages") or (
            ex["prompt"] + [{"role": "assistant", "content": ex["chosen"]}] if "prompt" in ex else None
        )
        text = tok.apply_chat_template(msgs, tokenize=False) if msgs else ex["text"]
        console.rule("rendered")
        console.print(text, markup=False)
    if job.png:
        plot_lengths(st["lengths"], job.max_seq_len, job.png)
        console.print(f"histogram: {job.png}")
