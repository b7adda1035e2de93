"""The harness every benchmark script here shares: alternating A/B rounds, per-round ratios, the median with its
spread, one result schema, the table and bench/results/<name>.json.

Rounds: a warm-up round that is not counted (it pays the cold reads, the first compilations, the page cache),
then `rounds` counted rounds with the arms in A B, B A, A B, ... order, so that drift of a shared machine hits
every arm alike and no arm always goes first. Each arm's figure in a round is compared with the baseline's in
the same round (a per-round ratio); the headline is the median of those ratios, reported with its spread
(min-max and the interquartile range). A result is `noisy` when its spread (IQR) is wider than its distance to
the target: the machine's noise, not the code, would decide whether the target is met.

Result schema (bench/results/<name>.json): name, ratio, target, met, noisy, spread {min, q1, q3, max, iqr},
rounds (the per-round ratios), config, and what the script adds (its own figures); `bench/summary.py` reads
them all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parser(doc: str, rounds: int = 5) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--rounds", type=int, default=rounds, help=f"counted rounds (default {rounds})")
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (default 1)")
    return ap


def ab_rounds(arms: dict[str, Callable[[], dict]], rounds: int = 5, warmup: int = 1) -> dict[str, list[dict]]:
    """Run each arm once per round, A B / B A alternating, after `warmup` uncounted rounds; an arm returns a dict
    of figures. Returns the counted figures per arm, round by round."""
    names = list(arms)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            figures = arms[name]()
            figures.setdefault("wall_s", time.perf_counter() - t0)
            if i >= warmup:
                out[name].append(figures)
        print(f"round {i + 1 - warmup if i >= warmup else 'warm-up'}: done", flush=True)
    return out


def endpoint_arm(cfg, ep, prompts, models: list[str] | None = None) -> Callable[[], dict]:
    """A closed-loop `ftx bench` run against one endpoint as an arm (`cfg`: ftx.bench.BenchConfig): output tok/s,
    total tok/s, P99 E2E seconds, errors. `prompts`: a list, or a function giving fresh prompts for every run;
    `models`: model names the requests are spread over (default: the endpoint's)."""

    def run() -> dict:
        from ftx import bench

        r = bench.measure(cfg, ep, prompts() if callable(prompts) else prompts, models=models)
        return {
            "tok_s": r.output_tokens_per_s,
            "total_tok_s": r.targets[0]["levels"][0]["summary"]["total_tokens_per_s"],
            "p99_e2e_s": r.e2e_s["p99"],
            "errors": r.errors,
        }

    return run


def per_round(runs: dict[str, list[dict]], metric: str, arm: str, baseline: str) -> list[float]:
    """arm / baseline of `metric`, round by round."""
    return [a[metric] / b[metric] for a, b in zip(runs[arm], runs[baseline])]


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def check(value: float, target: str | None) -> bool | None:
    """`target`: "<= 1.2" or ">= 3" (None: no target)."""
    if target is None:
        return None
    op, limit = target.split()
    return value <= float(limit) if op == "<=" else value >= float(limit)


def summarize(ratios: list[float], target: str | None) -> dict[str, Any]:
    """Median, spread, met and noisy of a list of per-round ratios."""
    med = statistics.median(ratios)
    q1, q3 = _quartiles(ratios)
    noisy = None
    if target is not None:
        noisy = (q3 - q1) > abs(med - float(target.split()[1]))
    return {
        "ratio": med,
        "target": target,
        "met": check(med, target),
        "noisy": noisy,
        "rounds": ratios,
        "spread": {"min": min(ratios), "q1": q1, "q3": q3, "max": max(ratios), "iqr": q3 - q1},
    }


def medians(runs: dict[str, list[dict]], metrics: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {arm: {m: statistics.median(r[m] for r in rs) for m in metrics} for arm, rs in runs.items()}


def write(name: str, headline: dict, config: dict, **extra) -> Path:
    """bench/results/<name>.json in the common schema; prints the headline line."""
    from rich.console import Console
    from rich.table import Table

    result = {
        "name": name,
        **headline,
        "config": config,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    dst = RESULTS / f"{name}.json"
    tmp = dst.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(dst)
    table = Table(title=f"{name}: headline")
    for col in ("ratio (median)", "target", "met", "spread min-max", "IQR", "noisy", "rounds"):
        table.add_column(col)
    s = headline["spread"]
    table.add_row(
        f"{headline['ratio']:.3f}",
        str(headline["target"]),
        _yes(headline["met"]),
        f"{s['min']:.3f}-{s['max']:.3f}",
        f"{s['iqr']:.3f}",
        _yes(headline["noisy"]),
        str(len(headline["rounds"])),
    )
    Console().print(table)
    print(f"wrote {dst}")
    return dst


def _yes(v: bool | None) -> str:
    return "—" if v is None else ("yes" if v else "no")


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def quickstart_run() -> Path:
    """The latest quickstart run (`make quickstart`), which several benchmarks measure."""
    run = ROOT / "runs" / "quickstart" / "latest"
    if not (run / "merged").is_dir():
        raise SystemExit(f"{run}: no quickstart run; run `make quickstart` first")
    return run
