"""`ftx eval RECIPE.yaml [key=value ...]` (the recipe up to its eval stage) and `ftx eval ab` (two models or
endpoints side by side, ftx.ab)."""

from __future__ import annotations

import click

from ..ab import ABJob
from .grammar import Alias, DefaultGroup, abs_path, console, load, options
from .recipe import _until


def _prompts(texts):
    return [("prompts", texts[0] if texts[0] == "mtbench" else str(abs_path("prompts")(texts)[0][1]))]


ALIASES = [
    Alias("--a", "a", raw=True, metavar="NAME=SOURCE"),
    Alias("--b", "b", raw=True, metavar="NAME=SOURCE"),
    Alias("--prompts", "prompts", parse=_prompts, metavar="mtbench|FILE"),
    Alias("--limit", "limit"),
    Alias("--max-tokens", "max_tokens"),
    Alias("--concurrency", "concurrency"),
    Alias("--judge-url", "judge.endpoint", raw=True),
    Alias("--judge-model", "judge.model", raw=True),
    Alias("--judge-gguf", "judge.gguf", parse=abs_path("judge.gguf"), metavar="FILE"),
    Alias("--out", "out", parse=abs_path("out")),
]


@click.group("eval", cls=DefaultGroup, default="run")
def eval_group():
    """The recipe up to its eval stage (`ftx eval RECIPE.yaml [key=value]`), or `ftx eval ab`: two models or
    endpoints answering the same prompts, side by side, with an optional judge."""


eval_group.add_command(_until("eval", "run"))


@eval_group.command("ab")
@click.argument("args", nargs=-1)
@options(ABJob, ALIASES)
def eval_ab(args, **params):
    """Side A and side B (an endpoint URL@MODEL, a .gguf file or a recipe run) answer the same prompts, greedy:
    metrics with intervals and paired differences where there are references, the answers that differ most,
    a judge's verdict if it passes its sanity checks; summary.md, answers.jsonl, judge.jsonl, report.html."""
    from pathlib import Path

    from .. import ab

    job = load(ABJob, args, ALIASES, params, "ab config").model
    con = console()
    summary = ab.run(job, Path(job.out).parent, con.status)
    click.echo((Path(job.out) / "summary.md").read_text())
    click.echo(f"report: {Path(job.out) / 'report.html'}")
    return summary


COMMANDS = [eval_group]
