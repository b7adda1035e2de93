"""`ftx data validate|split|convert|inspect`: check, split, convert and look at dataset files."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..stages.data import ConvertJob, InspectJob, SplitJob, ValidateJob
from .grammar import Alias, abs_path, console, load, options, overrides

ROWS = [Alias("--format", "format"), Alias("--encoding", "encoding", raw=True)]
VALIDATE = [*ROWS, Alias("--on-error", "on_error")]
SPLIT = [
    *VALIDATE,
    Alias("--out", "out", parse=abs_path("out")),
    Alias("--val", "val_fraction"),
    Alias("--test", "test_fraction"),
    Alias("--seed", "seed"),
    Alias("--near-dup", "near_dup_threshold"),
    Alias("--no-dedupe", "dedupe", is_flag=True, value=False),
]
CONVERT = [*ROWS, Alias("--to", "to"), Alias("--out", "out", parse=abs_path("out"))]
INSPECT = [
    *ROWS,
    Alias("--base-model", "base_model", raw=True),
    Alias("--max-seq-len", "max_seq_len"),
    Alias("--png", "png", parse=abs_path("png")),
    Alias("--examples", "examples"),
]


def _with_file(args) -> tuple:
    """A first word that is not key=value is the data file (`path=`)."""
    return (f"path={Path(args[0]).absolute()}", *args[1:]) if args and "=" not in args[0] else tuple(args)


@click.group()
def data():
    """Check, split, convert and inspect dataset files."""


@data.command("validate")
@click.argument("files", nargs=-1, required=True)
@options(ValidateJob, VALIDATE)
def data_validate(files, **params):
    """Validate FILES: every bad row as file:line: field: problem, and the drop counts by reason."""
    from rich.table import Table

    from ..core import config
    from ..core.rows import load as load_rows

    given = [("files", [str(Path(f).absolute()) for f in files], " ".join(files))]
    job = config.load(None, ValidateJob, [*given, *overrides(VALIDATE, params)], what="arguments").model
    bad = 0
    for f in job.files:
        _, report = load_rows(f, job.format, job.on_error, options=job.options())
        for p in report.problems:
            click.echo(p, err=True)  # plain lines: greppable, never wrapped
        table = Table(title=f"{f} ({report.format})")
        for col in ("rows read", "kept", "dropped, by reason"):
            table.add_column(col)
        dropped = ", ".join(f"{k}: {v}" for k, v in report.dropped.items()) or "none"
        table.add_row(str(report.rows_read), str(report.rows_kept), dropped)
        console().print(table)
        bad += report.rows_read - report.rows_kept
    sys.exit(1 if bad else 0)


@data.command("split")
@click.argument("args", nargs=-1)
@options(SplitJob, SPLIT)
def data_split(args, **params):
    """Dedupe and split FILE into train/val/test JSONL (seeded), removing prompts that leak across splits."""
    from ..core.cache import atomic_dir
    from ..core.splits import prepare
    from ..stages.data import write

    job = load(SplitJob, _with_file(args), SPLIT, params, "arguments").model
    prepared = prepare(job)  # bad rows fail here, before the output directory exists
    with atomic_dir(job.out) as tmp:
        r = write(*prepared, tmp)
        (tmp / "report.json").write_text(r.model_dump_json(indent=2))
    click.echo(r.model_dump_json(indent=2, exclude={"load"}))


@data.command("convert")
@click.argument("args", nargs=-1)
@options(ConvertJob, CONVERT)
def data_convert(args, **params):
    """Convert FILE (chat, sharegpt, alpaca or completion rows, any file type) to chat JSONL rows: --out FILE."""
    from ..stages.data import convert

    job = load(ConvertJob, _with_file(args), CONVERT, params, "arguments").model
    click.echo(f"{convert(job)} rows -> {job.out}")


@data.command("inspect")
@click.argument("args", nargs=-1)
@options(InspectJob, INSPECT)
def data_inspect(args, **params):
    """Counts, token lengths with the model's template, share truncated, roles and rendered examples of FILE."""
    from ..stages.data import show

    show(load(InspectJob, _with_file(args), INSPECT, params, "arguments").model, console())


COMMANDS = [data]
