"""`ftx bench [CONFIG.yaml] [key=value ...]` against OpenAI-compatible endpoints, and `ftx bench compare`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..bench import BenchJob
from .grammar import Alias, DefaultGroup, abs_path, load, numbers, options


def _synthetic(texts):
    return [("prompts.source", "synthetic"), ("prompts.input_tokens", int(texts[0]))]


def _prompts(texts):
    return [("prompts.source", "file"), ("prompts.path", str(Path(texts[0]).absolute()))]


def _sweep_max(texts):
    n = int(texts[0])
    return [("sweep", [2**i for i in range(n.bit_length()) if 2**i <= n])]


ALIASES = [
    Alias("--base-url", "base_url", raw=True),
    Alias("--model", "models", multiple=True, raw=True),
    Alias("--api-key", "api_key", raw=True),
    Alias("--target", "targets", multiple=True, raw=True),
    Alias("--out", "out", parse=abs_path("out")),
    Alias("--mode", "mode"),
    Alias("--concurrency", "concurrency"),
    Alias("--rate", "rate"),
    Alias("--max-in-flight", "max_in_flight"),
    Alias("--requests", "requests"),
    Alias("--sweep", "sweep", parse=numbers("sweep")),
    Alias("--sweep-max", "sweep", parse=_sweep_max, help="sweep 1, 2, 4, ... up to this concurrency"),
    Alias("--duration", "duration_s"),
    Alias("--warmup", "warmup"),
    Alias("--max-tokens", "max_tokens"),
    Alias("--ignore-eos", "ignore_eos", is_flag=True),
    Alias("--api", "api"),
    Alias("--assign", "assign"),
    Alias("--timeout", "timeout_s"),
    Alias("--seed", "seed"),
    Alias("--prompts", "prompts.path", parse=_prompts, metavar="FILE", help="prompts from a dataset file"),
    Alias(
        "--synthetic", "prompts.input_tokens", parse=_synthetic, metavar="N", help="synthetic prompts of N input tokens"
    ),
    Alias("--tokenizer", "prompts.tokenizer", raw=True),
    Alias("--slo-ttft-ms", "slo.ttft_ms"),
    Alias("--slo-tpot-ms", "slo.tpot_ms"),
    Alias("--slo-e2e-ms", "slo.e2e_ms"),
    Alias("--slo-percentile", "slo.percentile"),
    Alias("--hardware", "hardware", raw=True),
    Alias("--api-prices", "api_prices", parse=abs_path("api_prices")),
]


@click.group(cls=DefaultGroup, default="run")
def bench():
    """Load OpenAI-compatible endpoints (`ftx bench [CONFIG] [key=value] [--flags]`, see `ftx bench run -h`) and
    compare saved results (`compare`)."""


@bench.command("run")
@click.argument("args", nargs=-1)
@options(BenchJob, ALIASES)
def bench_run(args, **params):
    """TTFT / TPOT / ITL / E2E percentiles, throughput, goodput at an SLO, the highest load meeting it, and $ per
    1M tokens vs API prices, for an endpoint (--base-url, --model) or several (--target)."""
    from .. import bench as B
    from ..core.cache import atomic_dir

    job = load(BenchJob, args, ALIASES, params, "bench config").model
    if job.prompts.source == "heldout":
        raise click.UsageError("give --prompts FILE or --synthetic N (held-out prompts come with a recipe)")
    targets = job.endpoints()
    tok = B.prompts.load_tokenizer(job.prompts.tokenizer)
    prompts = B.load_prompts(job, tokenizer=tok)
    with atomic_dir(job.out) as tmp:
        try:
            B.run(job, targets, prompts, tmp, tok)
            interrupted = False
        except KeyboardInterrupt:  # the partial results are written: keep them, then exit 130
            interrupted = True
    if interrupted:
        click.echo(f"interrupted: partial results in {job.out}", err=True)
        sys.exit(130)
    click.echo((job.out / "summary.md").read_text())
    click.echo(f"results: {job.out}")


@bench.command("compare")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--names", default=None, help="comma-separated names (default: the directory names)")
@click.option(
    "--lora-break-even",
    is_flag=True,
    help="first = merged model, second = multi-LoRA server (same traffic): machines and $ for N adapters",
)
@click.option("--hardware", default=None, help="a hardware profile: YAML file or packaged name")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the markdown here too")
def bench_compare(dirs, names, lora_break_even, hardware, out):
    """Side by side: bench results of separate runs (summary.json of each DIR), ratios to the first."""
    from ..bench.report import compare_dirs
    from ..core.cache import atomic_write_text

    text = compare_dirs(list(dirs), names.split(",") if names else None, lora_break_even, hardware)
    click.echo(text)
    if out:
        atomic_write_text(out, text + "\n")


@bench.command("plan")
@click.option(
    "--results",
    "results",
    multiple=True,
    required=True,
    metavar="DIR[@HARDWARE]",
    help="a bench result directory, and the hardware profile it ran on if the result does not name one (repeat)",
)
@click.option("--rps", type=float, required=True, help="requests per second to serve")
@click.option("--ttft-ms", type=float, default=None, help="SLO: time to first token (default: each result's SLO)")
@click.option("--tpot-ms", type=float, default=None, help="SLO: time per output token")
@click.option("--e2e-ms", type=float, default=None, help="SLO: end-to-end latency")
@click.option("--percentile", type=float, default=99, show_default=True, help="the SLO's percentile")
@click.option("--headroom", type=float, default=0.2, show_default=True, help="spare capacity on top of --rps")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the plan (JSON) here too")
def bench_plan(results, rps, ttft_ms, tpot_ms, e2e_ms, percentile, headroom, out):
    """Replicas and $/month per hardware profile to serve --rps at the SLO, from measured goodput.

    The SLO limits given replace the results' own SLO (ftx.bench.capacity)."""
    from ..bench.capacity import command

    click.echo(command(list(results), rps, (ttft_ms, tpot_ms, e2e_ms), percentile, headroom, out))


COMMANDS = [bench]
