"""Bench stage and `ftx bench`: latency, throughput, goodput at an SLO and $ per 1M tokens against API prices.

    targets -> levels (one load level, or a sweep) -> one record per request (records.jsonl)
            -> per-level summary (stats.py) -> highest level meeting the SLO -> cost (cost.py) -> reports

Outputs in the bench directory: records.jsonl, summary.json, summary.md, latency_cdf.png, sweep.png (a sweep),
compare.md (several targets). Several targets are benched level by level in alternating order (A B, B A, ...)
so that machine drift hits them alike. Ctrl-C writes what finished, marked `interrupted`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .prompts import PromptsConfig
from .stats import SLO

REPO = Path(__file__).resolve().parents[3]
DEFAULT_PRICES = REPO / "bench" / "api_prices.yaml"


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["concurrency", "poisson", "burst"] = Field(
        "concurrency", description="concurrency: N in flight; poisson: arrivals at `rate`/s; burst: all at once")
    concurrency: int = Field(4, ge=1, description="concurrency mode: requests in flight")
    rate: float | None = Field(None, gt=0, description="poisson mode: requests per second")
    max_in_flight: int | None = Field(None, ge=1, description="poisson mode: cap on requests in flight")
    sweep: list[float] | None = Field(None, min_length=1, description="load levels (concurrencies, rates or burst "
                                                                       "sizes), benched one after the other")
    requests: int = Field(16, ge=1, description="measured requests per level (burst: the burst size)")
    duration_s: float | None = Field(None, gt=0, description="per level: send nothing new after this long")
    warmup: int = Field(2, ge=0, description="requests sent first and excluded from the figures")
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    ignore_eos: bool | None = Field(None, description="generate exactly max_tokens (vLLM, llama.cpp); "
                                                      "default: on for synthetic prompts")
    api: Literal["chat", "completions"] = "chat"
    timeout_s: float = Field(120, gt=0, description="per request")
    assign: Literal["round_robin", "random"] = Field("round_robin", description="requests over several model names")
    seed: int = 0
    prompts: PromptsConfig = PromptsConfig()
    slo: SLO = SLO()
    hardware: Path | None = Field(None, description="bench/hardware/*.yaml: $ per 1M tokens and break-even")
    api_prices: Path | None = Field(None, description="default: bench/api_prices.yaml")

    @model_validator(mode="after")
    def _mode_fields(self):
        if self.mode == "poisson" and self.rate is None and not self.sweep:
            raise ValueError("mode poisson needs rate (requests/s) or sweep")
        return self

    def levels(self) -> list[float]:
        if self.sweep:
            return list(self.sweep)
        return [{"concurrency": self.concurrency, "poisson": self.rate, "burst": self.requests}[self.mode]]


class BenchResult(BaseModel):
    mode: str
    targets: list[dict] = Field(description="per target: name, base_url, models, levels (level + summary + client)")
    slo: dict
    best: dict | None = Field(description="first target's highest level meeting the SLO")
    cost: dict | None
    apis: list[dict]
    compare: list[dict] | None
    interrupted: bool
    prompts: dict
    # headline figures (the best level, else the last one) of the first target
    requests: int
    errors: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: dict
    e2e_s: dict
    tpot_s: dict
    itl_s: dict
    token_source: str


@dataclass
class Target:
    name: str
    base_url: str
    api_key: str
    models: list[str] = field(default_factory=list)


async def _run_levels(cfg, targets, prompts, tokenizer, records, done_levels, on_done):
    """All levels x targets; returns True when interrupted (Ctrl-C), keeping what finished."""
    from . import client

    current = None
    try:
        for j, level in enumerate(cfg.levels()):
            for t in (targets if j % 2 == 0 else targets[::-1]):
                current = (t.name, level, asyncio.get_running_loop().time())
                info = await client.run_level(cfg, level, t.base_url, t.api_key, t.models, prompts, records,
                                              tokenizer, on_done, target=t.name)
                done_levels.append({"target": t.name, "level": level, **info})
                current = None
        return False
    except asyncio.CancelledError:
        if current:  # the level Ctrl-C cut short: its finished requests, over the time it ran
            name, level, t0 = current
            done_levels.append({"target": name, "level": level, "partial": True,
                                "wall_s": asyncio.get_running_loop().time() - t0, "client": None})
        return True


def run(cfg: BenchConfig, targets: list[Target], prompts: list, out: Path, tokenizer=None,
        preflight: bool = True) -> BenchResult:
    """Bench every target at every level, write the outputs into `out`, return the summary. Raises
    KeyboardInterrupt after writing the partial results when interrupted."""
    from rich.progress import Progress

    from . import client, report, stats

    if cfg.ignore_eos is None:
        cfg = cfg.model_copy(update={"ignore_eos": cfg.prompts.source == "synthetic"})
    if preflight:
        for t in targets:
            client.preflight(t.base_url, t.api_key, t.models)
    levels = cfg.levels()
    per_level = {"burst": lambda lv: int(lv)}.get(cfg.mode, lambda lv: cfg.requests)
    total = sum(per_level(lv) + cfg.warmup for lv in levels) * len(targets)
    records: list[dict] = []
    done: list[dict] = []
    with Progress(transient=False) as progress:
        task = progress.add_task(f"bench {cfg.mode} {', '.join(f'{lv:g}' for lv in levels)}", total=total)
        interrupted = asyncio.run(_run_levels(cfg, targets, prompts, tokenizer, records, done,
                                              lambda: progress.advance(task)))
    per_target = []
    for t in targets:
        lv = []
        for d in (d for d in done if d["target"] == t.name):
            recs = [r for r in records if r["target"] == t.name and r["level"] == d["level"]]
            lv.append({"level": d["level"], "partial": d.get("partial", False), "client": d["client"],
                       "summary": stats.summarize(recs, d["wall_s"], cfg.slo)})
        per_target.append({"name": t.name, "base_url": t.base_url, "models": t.models, "levels": lv})
    result = _result(cfg, per_target, interrupted, prompts)
    report.write(out, cfg, result, records)
    if interrupted:
        raise KeyboardInterrupt
    return result


def _result(cfg: BenchConfig, per_target: list[dict], interrupted: bool, prompts: list) -> BenchResult:
    from . import cost as C
    from . import report, stats

    first = per_target[0]
    best = stats.best_level(first["levels"])
    head = (best or (first["levels"][-1] if first["levels"] else None))
    own, apis = None, []
    if cfg.hardware and best:
        hw = C.load_hardware(cfg.hardware)
        own = C.self_hosting(hw, best["summary"]["goodput"])
        prices_file = cfg.api_prices or (DEFAULT_PRICES if DEFAULT_PRICES.exists() else None)
        if own and prices_file:
            g = best["summary"]["goodput"]
            apis = C.versus_apis(own, C.load_prices(prices_file), g["input_tokens_per_s"] + g["output_tokens_per_s"])
    s = head["summary"] if head else stats.summarize([], 0.0, cfg.slo)
    return BenchResult(
        mode=cfg.mode, targets=per_target, slo=cfg.slo.model_dump(), interrupted=interrupted,
        best={"level": best["level"], "summary": best["summary"]} if best else None, cost=own, apis=apis,
        compare=report.compare_rows(per_target) if len(per_target) > 1 else None,
        prompts={"source": cfg.prompts.source, "count": len(prompts), "api": cfg.api, "max_tokens": cfg.max_tokens,
                 "ignore_eos": cfg.ignore_eos},
        requests=s["requests"], errors=s["errors"], output_tokens_per_s=s["output_tokens_per_s"],
        requests_per_s=s["request_throughput"], ttft_s=s["ttft_s"], e2e_s=s["e2e_s"], tpot_s=s["tpot_s"],
        itl_s=s["itl_s"], token_source=s["token_source"])


def load_prompts(cfg: BenchConfig, heldout: list[list[dict]] | None = None, tokenizer=None) -> list:
    """The prompts the config asks for (held-out conversations are passed in by the recipe)."""
    from ..errors import FtxError
    from . import prompts as P

    src = cfg.prompts
    if src.source == "synthetic":
        return P.synthetic(src.input_tokens, src.count, src.seed, tokenizer)
    if src.source == "file":
        if src.path is None:
            raise FtxError("bench.prompts.path: needed for source file")
        return P.from_file(src.path)
    if not heldout:
        raise FtxError("bench.prompts.source heldout: no held-out prompts here (use file or synthetic)")
    return [m[:-1] if m[-1]["role"] == "assistant" else m for m in heldout]


def summary_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def measure(cfg: BenchConfig, endpoint, prompts: list, models: list[str] | None = None, out: Path | None = None,
            tokenizer=None) -> BenchResult:
    """Bench one serve.Endpoint (its model, or `models` spread over), outputs into `out` or a temp dir."""
    import tempfile

    target = Target(endpoint.model, endpoint.base_url, endpoint.api_key, models or [endpoint.model])
    return run(cfg, [target], prompts, out or Path(tempfile.mkdtemp(prefix="ftx-bench-")), tokenizer)


def ab_rounds(cfg: BenchConfig, arms: dict, prompts: list, rounds: int) -> dict[str, list[dict]]:
    """Two arms (name -> (endpoint, models or None)) loaded one at a time in A B B A ... order, so that machine
    drift and noise hit both alike; per arm, one row of headline figures per round."""
    names = list(arms)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            ep, models = arms[name]
            r = measure(cfg, ep, prompts, models=models)
            s = r.targets[0]["levels"][0]["summary"]
            runs[name].append({"tok_s": r.output_tokens_per_s, "total_tok_s": s["total_tokens_per_s"],
                               "p99_e2e_s": r.e2e_s["p99"], "p99_ttft_s": r.ttft_s["p99"], "errors": r.errors})
    return runs


def ab_summary(runs: dict[str, list[dict]], title: str, ratio_label: str) -> dict:
    """Medians per arm and the medians of the per-round ratios second arm / first arm; prints a table."""
    import statistics

    from rich.console import Console
    from rich.table import Table

    (a, ra), (b, rb) = runs.items()
    tput = [y["tok_s"] / x["tok_s"] for x, y in zip(ra, rb)]
    p99 = [y["p99_e2e_s"] / x["p99_e2e_s"] for x, y in zip(ra, rb)]
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("tok_s", "total_tok_s", "p99_e2e_s", "p99_ttft_s")}
           for k, v in runs.items()}
    table = Table(title=title)
    for col in ("config", "output tok/s", "P99 e2e s", "P99 TTFT s", "errors"):
        table.add_column(col)
    for k, v in med.items():
        table.add_row(k, f"{v['tok_s']:.1f}", f"{v['p99_e2e_s']:.3f}", f"{v['p99_ttft_s']:.3f}",
                      str(sum(x["errors"] for x in runs[k])))
    out = {"ratio": statistics.median(tput), "p99_ratio": statistics.median(p99), "ratios_per_round": tput,
           "p99_ratios_per_round": p99, "median": med, "runs": runs}
    table.add_row(ratio_label, f"{out['ratio']:.3f}x", f"{out['p99_ratio']:.3f}x", "", "")
    Console().print(table)
    return out
