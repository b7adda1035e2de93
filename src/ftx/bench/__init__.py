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

from ..core.config import HardwareFile, PricesFile
from .loads import PROFILES
from .prompts import PromptsConfig
from .stats import SLO


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal[tuple(PROFILES)] = Field(
        "concurrency",
        description="load profile (ftx.bench.loads): concurrency: N in flight; poisson: arrivals at "
        "`rate`/s; burst: all at once",
    )
    concurrency: int = Field(4, ge=1, description="concurrency mode: requests in flight")
    rate: float | None = Field(None, gt=0, description="poisson mode: requests per second")
    max_in_flight: int | None = Field(None, ge=1, description="poisson mode: cap on requests in flight")
    sweep: list[float] | None = Field(
        None, min_length=1, description="load levels (concurrencies, rates or burst sizes), benched one after the other"
    )
    requests: int = Field(16, ge=1, description="measured requests per level (burst: the burst size)")
    duration_s: float | None = Field(None, gt=0, description="per level: send nothing new after this long")
    warmup: int = Field(2, ge=0, description="requests sent first and excluded from the figures")
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    ignore_eos: bool | None = Field(
        None, description="generate exactly max_tokens (vLLM, llama.cpp); default: on for synthetic prompts"
    )
    api: Literal["chat", "completions"] = "chat"
    timeout_s: float = Field(120, gt=0, description="per request")
    assign: Literal["round_robin", "random"] = Field("round_robin", description="requests over several model names")
    seed: int = 0
    prompts: PromptsConfig = PromptsConfig()
    slo: SLO = SLO()
    hardware: HardwareFile | None = Field(
        None,
        description="a hardware profile (YAML file, or a packaged one by "
        "name: cloud-2vcpu, cloud-rtx4090, rtx4090-workstation): $ per 1M tokens "
        "and the break-even volume",
    )
    api_prices: PricesFile | None = Field(None, description="API price list (default: the packaged api_prices.yaml)")

    @model_validator(mode="after")
    def _mode_fields(self):
        problem = PROFILES[self.mode].check(self)
        if problem:
            raise ValueError(problem)
        return self

    def levels(self) -> list[float]:
        return list(self.sweep) if self.sweep else [PROFILES[self.mode].default_level(self)]


class BenchResult(BaseModel):
    mode: str
    targets: list[dict] = Field(description="per target: name, base_url, models, levels (level + summary + client)")
    slo: dict
    best: dict | None = Field(description="first target's highest level meeting the SLO")
    cost: dict | None
    apis: list[dict]
    compare: list[dict] | None
    interrupted: bool
    prompts: dict = Field(description="source, count, seed (synthetic), api, max_tokens, ignore_eos")
    warnings: list[str] = Field(default_factory=list, description="e.g. a level served mostly from a prompt cache")
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


class BenchJob(BenchConfig):
    """`ftx bench`: a bench config plus the endpoints to load and where the results go."""

    base_url: str | None = Field(None, description="an endpoint, e.g. http://127.0.0.1:8080/v1")
    models: list[str] = Field(
        default_factory=list, description="model names at base_url (several: spread over them, see assign)"
    )
    api_key: str | None = Field(None, description="the endpoint's key (default: $FTX_API_KEY)")
    targets: list[str] = Field(
        default_factory=list,
        description="several endpoints side by side: NAME=URL@MODEL[,MODEL] (key: $FTX_API_KEY_<NAME>, else api_key)",
    )
    out: Path = Field(description="results directory")

    def endpoints(self) -> list[Target]:
        import os

        from ..core.errors import FtxError

        key = self.api_key or os.environ.get("FTX_API_KEY") or "none"
        if self.base_url and not self.models:
            raise FtxError("base_url needs a model name (--model)")
        out = [Target("endpoint", self.base_url, key, list(self.models))] if self.base_url else []
        for spec in self.targets:
            name, sep, rest = spec.partition("=")
            url, at, names = rest.rpartition("@")
            if not sep or not at or not name or not url or not names:
                raise FtxError(f"target {spec!r}: expected NAME=URL@MODEL[,MODEL]")
            env_key = os.environ.get(f"FTX_API_KEY_{name.upper().replace('-', '_')}", key)
            out.append(Target(name, url, env_key, names.split(",")))
        if not out:
            raise FtxError("give an endpoint: --base-url URL --model NAME, or --target NAME=URL@MODEL")
        if len({t.name for t in out}) < len(out):
            raise FtxError("target names must differ")
        return out


async def _run_levels(cfg, targets, prompts, tokenizer, records, done_levels, on_done):
    """All levels x targets; returns True when interrupted (Ctrl-C), keeping what finished."""
    from . import client

    current = None
    seen: set = set()  # every prompt the run sent, so that a repeat (a likely prompt-cache hit) is marked
    try:
        for j, level in enumerate(cfg.levels()):
            for k, t in list(enumerate(targets)) if j % 2 == 0 else list(enumerate(targets))[::-1]:
                current = (t.name, level, asyncio.get_running_loop().time())
                here, start = prompts.get(j, k, len(targets)), prompts.offset(j, k, len(targets))
                info = await client.run_level(
                    cfg, level, t.base_url, t.api_key, t.models, here, records, tokenizer, on_done, t.name, seen, start
                )
                done_levels.append({"target": t.name, "level": level, **info})
                current = None
        return False
    except asyncio.CancelledError:
        if current:  # the level Ctrl-C cut short: its finished requests, over the time it ran
            name, level, t0 = current
            done_levels.append(
                {
                    "target": name,
                    "level": level,
                    "partial": True,
                    "wall_s": asyncio.get_running_loop().time() - t0,
                    "client": None,
                }
            )
        return True


def run(
    cfg: BenchConfig, targets: list[Target], prompts, out: Path, tokenizer=None, preflight: bool = True
) -> BenchResult:
    """Bench every target at every level with `prompts` (a PromptSet, or a list sent as it is), write the outputs
    into `out`, return the summary. Raises KeyboardInterrupt after writing the partial results when interrupted."""
    from rich.progress import Progress

    from . import client, report, server, stats
    from .prompts import PromptSet

    if not isinstance(prompts, PromptSet):
        prompts = PromptSet(list(prompts))
    prompts.counts = [PROFILES[cfg.mode].requests(cfg, lv) + cfg.warmup for lv in cfg.levels()]

    if cfg.ignore_eos is None:
        cfg = cfg.model_copy(update={"ignore_eos": cfg.prompts.source == "synthetic"})
    if preflight:
        for t in targets:
            client.preflight(t.base_url, t.api_key, t.models)
    levels = cfg.levels()
    total = sum(PROFILES[cfg.mode].requests(cfg, lv) + cfg.warmup for lv in levels) * len(targets)
    records: list[dict] = []
    done: list[dict] = []
    with Progress(transient=False) as progress:
        task = progress.add_task(f"bench {cfg.mode} {', '.join(f'{lv:g}' for lv in levels)}", total=total)
        interrupted = asyncio.run(
            _run_levels(cfg, targets, prompts, tokenizer, records, done, lambda: progress.advance(task))
        )
    per_target = []
    for t in targets:
        lv = []
        for d in (d for d in done if d["target"] == t.name):
            recs = [r for r in records if r["target"] == t.name and r["level"] == d["level"]]
            summary = stats.summarize(recs, d["wall_s"], cfg.slo)
            own = server.view(recs, *d.get("server_metrics", (None, None)))
            lv.append(
                {
                    "level": d["level"],
                    "partial": d.get("partial", False),
                    "client": d["client"],
                    "summary": summary,
                    "server": own,
                    "agreement": server.agreement(summary, own),
                }
            )
        per_target.append({"name": t.name, "base_url": t.base_url, "models": t.models, "levels": lv})
    result = _result(cfg, per_target, interrupted, prompts)
    for w in result.warnings:
        progress.console.print(f"[yellow]warning:[/] {w}", highlight=False)
    report.write(out, cfg, result, records)
    if interrupted:
        raise KeyboardInterrupt
    return result


def _result(cfg: BenchConfig, per_target: list[dict], interrupted: bool, prompts) -> BenchResult:
    from . import cost as C
    from . import report, stats

    first = per_target[0]
    best = stats.best_level(first["levels"])
    head = best or (first["levels"][-1] if first["levels"] else None)
    own, apis = None, []
    if cfg.hardware and best:
        hw = C.load_hardware(cfg.hardware)
        own = C.self_hosting(hw, best["summary"]["goodput"])
        if own:
            g = best["summary"]["goodput"]
            apis = C.versus_apis(own, C.load_prices(cfg.api_prices), g["input_tokens_per_s"] + g["output_tokens_per_s"])
    s = head["summary"] if head else stats.summarize([], 0.0, cfg.slo)
    return BenchResult(
        mode=cfg.mode,
        targets=per_target,
        slo=cfg.slo.model_dump(),
        interrupted=interrupted,
        warnings=stats.cache_warnings(per_target),
        best={"level": best["level"], "summary": best["summary"]} if best else None,
        cost=own,
        apis=apis,
        compare=report.compare_rows(per_target) if len(per_target) > 1 else None,
        prompts={
            "source": cfg.prompts.source,
            **prompts.describe(),
            "api": cfg.api,
            "max_tokens": cfg.max_tokens,
            "ignore_eos": cfg.ignore_eos,
        },
        requests=s["requests"],
        errors=s["errors"],
        output_tokens_per_s=s["output_tokens_per_s"],
        requests_per_s=s["request_throughput"],
        ttft_s=s["ttft_s"],
        e2e_s=s["e2e_s"],
        tpot_s=s["tpot_s"],
        itl_s=s["itl_s"],
        token_source=s["token_source"],
    )


def load_prompts(cfg: BenchConfig, heldout: list[list[dict]] | None = None, tokenizer=None):
    """The prompts the config asks for, as a PromptSet (held-out conversations are passed in by the recipe)."""
    from ..core.errors import FtxError
    from . import prompts as P

    src = cfg.prompts
    if src.source == "synthetic":
        return P.PromptSet(synthetic=src, tokenizer=tokenizer)
    if src.source == "file":
        if src.path is None:
            raise FtxError("bench.prompts.path: needed for source file")
        return P.PromptSet(P.from_file(src.path, src.encoding))
    if not heldout:
        raise FtxError("bench.prompts.source heldout: no held-out prompts here (use file or synthetic)")
    from ..core.chat import split_answers

    return P.PromptSet(split_answers(heldout)[0])


def summary_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def measure(
    cfg: BenchConfig, endpoint, prompts: list, models: list[str] | None = None, out: Path | None = None, tokenizer=None
) -> BenchResult:
    """Bench one serve.Endpoint (its model, or `models` spread over), outputs into `out` or a temp dir."""
    import tempfile

    target = Target(endpoint.model, endpoint.base_url, endpoint.api_key, models or [endpoint.model])
    return run(cfg, [target], prompts, out or Path(tempfile.mkdtemp(prefix="ftx-bench-")), tokenizer)
