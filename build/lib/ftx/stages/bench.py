"""Bench stage: load the endpoint the serve stage keeps up (ftx.bench: latency distributions, throughput, goodput
at an SLO, the highest load meeting it, $ per 1M tokens against API prices)."""

from __future__ import annotations

from pathlib import Path

from ..bench import BenchConfig, BenchResult
from ..stage import Artifact, Stage


class Bench(Stage):
    name = "bench"
    config = BenchConfig
    result = BenchResult
    needs = ("serve", "data")
    reads = ("name",)

    def run(self, ctx, out: Path) -> BenchResult:
        from .. import bench
        from ..bench.prompts import load_tokenizer
        from ..core.chat import read_split

        ep = ctx.service("serve")
        d = ctx.upstream("data").result
        held = read_split(ctx.file("data", d["heldout_file"] or d["val_file"]))
        tok = load_tokenizer(ctx.cfg.prompts.tokenizer or str(ctx.base_dir))
        prompts = bench.load_prompts(ctx.cfg, held, tok)
        target = bench.Target(ctx.setting("name"), ep.base_url, ep.api_key, [ep.model])
        return bench.run(ctx.cfg, [target], prompts, out, tok)

    def headline(self, r: dict) -> str:
        best = r.get("best")
        slo = f"highest load meeting the SLO: {best['level']:g}" if best else "no load level meets the SLO"
        cost = f", ${r['cost']['usd_per_1m_tokens']:.3f}/1M tokens" if r.get("cost") else ""
        e2e = r["e2e_s"]["p99"]
        return f"P99 e2e {1000 * e2e:.0f} ms, {r['output_tokens_per_s']:.1f} tok/s; {slo}{cost}" if e2e else slo

    def artifacts(self, r: dict) -> list[Artifact]:
        return [Artifact(p, p, copy=True, optional=True) for p in ("latency_cdf.png", "sweep.png")]

    def card_data(self, r: dict, recipe: str) -> dict:
        from ..bench.report import markdown

        return {**r, "markdown": markdown(r), "sweep": len(r["targets"][0]["levels"]) > 1}
