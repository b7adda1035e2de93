"""`ftx eval RECIPE.yaml [key=value ...]` (the recipe up to its eval stage), `ftx eval ab` (two models or
endpoints side by side, ftx.ab) and `ftx eval lm-eval` (lm-evaluation-harness, ftx.lmeval)."""

from __future__ import annotations

import click

from ..ab import ABJob
from ..lmeval import LmEvalJob
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


def _tasks(texts):
    return [("tasks", [t for t in texts[0].split(",") if t])]


LM_ALIASES = [
    Alias("--tasks", "tasks", parse=_tasks, metavar="T1,T2"),
    Alias("--model", "model", raw=True),
    Alias("--adapter", "adapter", parse=abs_path("adapter"), metavar="DIR"),
    Alias("--endpoint", "endpoint", raw=True),
    Alias("--limit", "limit"),
    Alias("--batch-size", "batch_size"),
    Alias("--out", "out", parse=abs_path("out")),
]


@eval_group.command("lm-eval")
@click.argument("args", nargs=-1)
@options(LmEvalJob, LM_ALIASES)
def eval_lm_eval(args, **params):
    """lm-evaluation-harness (its Python API) on a model in-process (HF, fp32 on CPU, optional adapter) or an
    OpenAI-compatible endpoint (generation tasks only: log-likelihood tasks are refused there). Offline: local task
    data only. Prints each task's metrics with their standard errors; writes --out."""
    from pathlib import Path

    from .. import lmeval

    job = load(LmEvalJob, args, LM_ALIASES, params, "lm-eval config").model
    with console().status(f"lm-eval: {', '.join(job.tasks)} on {job.endpoint or job.model}"):
        r = lmeval.run(
            job.tasks,
            job.model,
            adapter=Path(job.adapter) if job.adapter else None,
            endpoint=job.endpoint,
            model_name=job.model if job.endpoint else None,
            limit=job.limit,
            batch_size=job.batch_size,
            out=Path(job.out),
        )
    click.echo("| task | metric | value | stderr | n |\n|---|---|---:|---:|---:|")
    for name, t in r["tasks"].items():
        for metric, v in t["metrics"].items():
            stderr = "" if v.get("stderr") is None else f"{v['stderr']:.4f}"
            click.echo(f"| {name} | {metric} | {v['value']:.4f} | {stderr} | {t['n']} |")
    click.echo(f"results: {job.out}")


COMMANDS = [eval_group]
