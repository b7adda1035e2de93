"""Bench stage: bounded streaming load against an OpenAI-compatible endpoint with the `openai` async client.

Every request is recorded (TTFT, end-to-end latency, time per output token, token counts, errors);
percentiles are computed from those records with numpy. Outputs: records.jsonl, summary.json,
latency_cdf.png.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: int = Field(16, ge=1, description="measured requests (after warmup)")
    concurrency: int = Field(4, ge=1)
    warmup: int = Field(2, ge=0, description="requests sent first and excluded from the figures")
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    timeout_s: float = Field(120, gt=0, description="per request")


class BenchResult(BaseModel):
    requests: int
    ok: int
    errors: int
    concurrency: int
    wall_s: float
    ttft_s: dict
    e2e_s: dict
    tpot_s: dict
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    token_source: str


PCTS = (50, 90, 99)


def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"mean": None, **{f"p{p}": None for p in PCTS}}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PCTS}}


async def one_request(client, model: str, messages: list[dict], cfg: BenchConfig, t_origin: float) -> dict:
    rec = {"start_s": time.perf_counter() - t_origin, "ok": False, "ttft_s": None, "e2e_s": None,
           "output_tokens": 0, "prompt_tokens": None, "chunks": 0, "error": None}
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature, stream=True,
            stream_options={"include_usage": True}, timeout=cfg.timeout_s)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                if rec["ttft_s"] is None:
                    rec["ttft_s"] = time.perf_counter() - t0
                rec["chunks"] += 1
            if chunk.usage:
                rec["output_tokens"] = chunk.usage.completion_tokens
                rec["prompt_tokens"] = chunk.usage.prompt_tokens
        rec["e2e_s"] = time.perf_counter() - t0
        rec["token_source"] = "usage" if rec["prompt_tokens"] is not None else "chunks"
        if rec["token_source"] == "chunks":
            rec["output_tokens"] = rec["chunks"]
        n = rec["output_tokens"]
        rec["tpot_s"] = (rec["e2e_s"] - rec["ttft_s"]) / (n - 1) if n > 1 and rec["ttft_s"] is not None else None
        rec["ok"] = True
    except Exception as e:  # counted, never fatal: a bench reports errors
        rec["e2e_s"] = time.perf_counter() - t0
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    return rec


def _limits(concurrency: int):
    """Connection limits without keep-alive (openai >= 3 is built on httpx2, older releases on httpx)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx

    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)


async def _load(cfg: BenchConfig, base_url: str, api_key: str, model: str | list[str], prompts: list[list[dict]],
                on_done=None):
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    # A fresh connection per request: reusing pooled keep-alive connections made the first request after the
    # warmup fail on a connection the server had already closed (seen with llama-server). Loopback connect
    # costs well under a millisecond; no retries, so every failure is counted.
    http = DefaultAsyncHttpxClient(limits=_limits(cfg.concurrency), timeout=cfg.timeout_s)
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http)
    sem = asyncio.Semaphore(cfg.concurrency)
    t_origin = time.perf_counter()
    models = [model] if isinstance(model, str) else list(model)

    async def task(i: int) -> dict:
        async with sem:
            m = models[i % len(models)]  # several names (adapters): round robin
            rec = await one_request(client, m, prompts[i % len(prompts)], cfg, t_origin)
            rec["i"], rec["model"] = i, m
            if on_done:
                on_done()
            return rec

    if cfg.warmup:
        await asyncio.gather(*(task(-1 - i) for i in range(cfg.warmup)))
    t0 = time.perf_counter()
    records = await asyncio.gather(*(task(i) for i in range(cfg.requests)))
    wall = time.perf_counter() - t0
    await client.close()
    return list(records), wall


def summarize(records: list[dict], wall_s: float, concurrency: int) -> BenchResult:
    ok = [r for r in records if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    sources = {r.get("token_source") for r in ok}
    return BenchResult(
        requests=len(records), ok=len(ok), errors=len(records) - len(ok), concurrency=concurrency, wall_s=wall_s,
        ttft_s=percentiles([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        e2e_s=percentiles([r["e2e_s"] for r in ok]),
        tpot_s=percentiles([r["tpot_s"] for r in ok if r.get("tpot_s") is not None]),
        output_tokens=out_tokens, output_tokens_per_s=out_tokens / wall_s if wall_s else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s else 0.0,
        token_source=sources.pop() if len(sources) == 1 else ("mixed" if sources else "none"),
    )


def plot_cdf(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in (("ttft_s", "TTFT"), ("e2e_s", "end-to-end")):
        vals = np.sort([r[key] for r in records if r["ok"] and r[key] is not None])
        if len(vals):
            ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post", label=label)
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def run(cfg: BenchConfig, base_url: str, api_key: str, model: str | list[str], prompts: list[list[dict]],
        out: Path) -> BenchResult:
    from rich.progress import Progress

    with Progress() as progress:
        task = progress.add_task(f"bench c={cfg.concurrency}", total=cfg.requests + cfg.warmup)
        records, wall = asyncio.run(
            _load(cfg, base_url, api_key, model, prompts, on_done=lambda: progress.advance(task)))
    with open(out / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    result = summarize(records, wall, cfg.concurrency)
    (out / "summary.json").write_text(result.model_dump_json(indent=2))
    plot_cdf(records, out / "latency_cdf.png")
    return result
