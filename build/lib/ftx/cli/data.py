"""`ftx data validate|split|inspect`: check, split and look at dataset files."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import click
from pydantic import BaseModel, ConfigDict, Field

from ..core.config import InputFile
from ..core.rows import FORMATS
from ..core.splits import DataSource
from .grammar import Alias, abs_path, console, load, options


class ValidateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    files: list[InputFile] = Field(min_length=1, description="dataset files (.jsonl, .json, .csv, .parquet)")
    format: Literal[FORMATS] = Field("auto", description="row format; auto: detected from the first row")
    on_error: Literal["fail", "skip"] = Field(
        "skip", description="skip: report every bad row and the drop counts; fail: stop at the first"
    )


class SplitJob(DataSource):
    out: Path = Field(description="directory for train/val/test.jsonl and report.json")


class InspectJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: InputFile = Field(description="a dataset file")
    format: Literal[FORMATS] = "auto"
    base_model: str = Field("smollm2-135m-instruct", description="whose tokenizer and chat template")
    max_seq_len: int = Field(512, ge=16, description="the training sequence length to compare against")
    png: Path | None = Field(None, description="write a token-length histogram here")
    examples: int = Field(2, ge=0, description="rendered rows to show")


FMT = [Alias("--format", "format"), Alias("--on-error", "on_error")]
VALIDATE = FMT
SPLIT = [
    *FMT,
    Alias("--out", "out", parse=abs_path("out")),
    Alias("--val", "val_fraction"),
    Alias("--test", "test_fraction"),
    Alias("--seed", "seed"),
    Alias("--near-dup", "near_dup_threshold"),
    Alias("--no-dedupe", "dedupe", is_flag=True, value=False),
]
INSPECT = [
    Alias("--format", "format"),
    Alias("--base-model", "base_model", raw=True),
    Alias("--max-seq-len", "max_seq_len"),
    Alias("--png", "png", parse=abs_path("png")),
    Alias("--examples", "examples"),
]


def _files(files) -> list[tuple]:
    return [("files", [str(Path(f).absolute()) for f in files], " ".join(files))]


@click.group()
def data():
    """Check, split and inspect dataset files."""


@data.command("validate")
@click.argument("files", nargs=-1, required=True)
@options(ValidateJob, VALIDATE)
def data_validate(files, **params):
    """Validate FILES: every bad row as file:line: field: problem, and the drop counts by reason."""
    from rich.table import Table

    from ..core import config
    from ..core.rows import load as load_rows
    from .grammar import overrides

    job = config.load(None, ValidateJob, [*_files(files), *overrides(VALIDATE, params)], what="arguments").model
    bad = 0
    for f in job.files:
        _, report = load_rows(f, job.format, job.on_error)
        for p in report.problems:
            click.echo(p, err=True)  # plain lines: greppable, never wrapped
        table = Table(title=f"{f} ({report.format})")
        for col in ("rows read", "kept", "dropped, by reason"):
            table.add_column(col)
        table.add_row(
            str(report.rows_read),
            str(report.rows_kept),
            ", ".join(f"{k}: {v}" for k, v in report.dropped.items()) or "none",
        )
        console().print(table)
        bad += report.rows_read - report.rows_kept
    sys.exit(1 if bad else 0)


@data.command("split")
@click.argument("args", nargs=-1)
@options(SplitJob, SPLIT)
def data_split(args, **params):
    """Dedupe and split FILE (or a config: path=FILE ...) into train/val/test JSONL, removing leaking prompts."""
    from ..core.cache import atomic_dir
    from ..core.splits import prepare
    from ..stages.data import write

    args = [f"path={Path(args[0]).absolute()}", *args[1:]] if args and "=" not in args[0] else list(args)
    job = load(SplitJob, tuple(args), SPLIT, params, "arguments").model
    prepared = prepare(job)  # bad rows fail here, before the output directory exists
    with atomic_dir(job.out) as tmp:
        r = write(*prepared, tmp)
        (tmp / "report.json").write_text(r.model_dump_json(indent=2))
    click.echo(r.model_dump_json(indent=2, exclude={"load"}))


@data.command("inspect")
@click.argument("args", nargs=-1)
@options(InspectJob, INSPECT)
def data_inspect(args, **params):
    """Counts, token lengths with the model's template, share truncated, roles and rendered examples of FILE."""
    from ..stages.data import show

    args = [f"path={Path(args[0]).absolute()}", *args[1:]] if args and "=" not in args[0] else list(args)
    show(load(InspectJob, tuple(args), INSPECT, params, "arguments").model, console())


COMMANDS = [data]
