"""The load generator: streaming requests with the `openai` async client, one record per request.

A level's requests are sent as its load profile says (ftx.bench.loads). Warmup requests go first and are not
recorded. A level ends after `requests` requests or `duration_s` seconds (no new request is sent after that;
those in flight finish or time out). Errors and timeouts are recorded, never fatal. Ctrl-C stops sending,
cancels what is in flight and keeps what finished.
"""

from __future__ import annotations

import asyncio
import json
import time

from . import prompts as P
from . import server as S


def _limits(concurrency: int):
    """Connection limits without keep-alive (openai >= 3 is built on httpx2, older releases on httpx)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx

    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)


def make_client(base_url: str, api_key: str, concurrency: int, timeout_s: float):
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    # A fresh connection per request: reusing pooled keep-alive connections made the first request after the
    # warmup fail on a connection the server had already closed (seen with llama-server). Loopback connect
    # costs well under a millisecond; no retries, so every failure is counted.
    http = DefaultAsyncHttpxClient(limits=_limits(max(concurrency, 1)), timeout=timeout_s)
    return AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http)


async def one_request(client, model: str, prompt, cfg, t_origin: float, tokenizer=None) -> dict:
    """Send one streaming request; the record has TTFT, ITLs, TPOT, E2E, token counts and the error if any.

    The openai client sends the request (auth, timeouts, retries off, HTTP errors as exceptions); the SSE
    lines are parsed here with json.loads, as `vllm bench serve` does, instead of building a pydantic object
    per chunk: that cost ~1.7 ms of CPU per chunk on this 2-core machine, CPU the server under test needs."""
    rec = {
        "start_s": time.perf_counter() - t_origin,
        "model": model,
        "ok": False,
        "ttft_s": None,
        "e2e_s": None,
        "tpot_s": None,
        "itl_s": [],
        "input_tokens": None,
        "output_tokens": None,
        "cached_tokens": None,
        "chunks": 0,
        "token_source": None,
        "finish_reason": None,
        "error": None,
        "server": None,  # the server's own timings of this request (llama-server), see ftx.bench.server
    }
    extra = {"ignore_eos": True} if cfg.ignore_eos else None
    common = dict(
        model=model,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        stream=True,
        stream_options={"include_usage": True},
        timeout=cfg.timeout_s,
        extra_body=extra,
    )
    chat = cfg.api == "chat"
    t0 = last = time.perf_counter()
    text = []
    usage = None
    try:
        api = client.chat.completions if chat else client.completions
        request = (
            api.with_streaming_response.create(messages=P.as_messages(prompt), **common)
            if chat
            else api.with_streaming_response.create(prompt=P.as_text(prompt), **common)
        )
        async with request as response:
            async for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:  # an error sent inside the stream
                    raise RuntimeError(f"stream error: {json.dumps(chunk['error'])[:200]}")
                for c in chunk.get("choices") or ():
                    piece = ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""
                    if piece:
                        if rec["ttft_s"] is None:
                            rec["ttft_s"] = now - t0
                        else:
                            rec["itl_s"].append(now - last)
                        last = now
                        rec["chunks"] += 1
                        text.append(piece)
                    if c.get("finish_reason"):
                        rec["finish_reason"] = c["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("timings"):
                    rec["server"] = S.record_timings(chunk["timings"])
        rec["e2e_s"] = time.perf_counter() - t0
        if usage is not None and usage.get("completion_tokens") is not None:
            rec["input_tokens"], rec["output_tokens"], rec["token_source"] = (
                usage.get("prompt_tokens"),
                usage["completion_tokens"],
                "usage",
            )
            # prompt tokens the server took from its prompt cache (llama-server; vLLM with
            # --enable-prompt-tokens-details): a high share makes TTFT a warm-cache figure
            rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        elif tokenizer is not None:  # the server sent no usage: count with the model's tokenizer
            rec["output_tokens"] = P.count_tokens(tokenizer, "".join(text))
            rec["input_tokens"] = P.count_prompt_tokens(tokenizer, prompt, cfg.api)
            rec["token_source"] = "tokenizer"
        else:
            rec["output_tokens"], rec["token_source"] = rec["chunks"], "chunks"
        n = rec["output_tokens"] or 0
        if n > 1 and rec["ttft_s"] is not None:
            rec["tpot_s"] = (rec["e2e_s"] - rec["ttft_s"]) / (n - 1)
        rec["ok"] = rec["ttft_s"] is not None or n > 0
        if not rec["ok"]:
            rec["error"] = "EmptyResponse: the stream ended without any content"
    except asyncio.CancelledError:
        raise  # Ctrl-C: not a finished request, not recorded
    except Exception as e:  # counted, never fatal: a bench reports errors
        rec["e2e_s"] = time.perf_counter() - t0
        status = getattr(e, "status_code", None)
        rec["error"] = f"{type(e).__name__}{f' {status}' if status else ''}: {e}"[:300]
        # openai's APITimeoutError before the response, httpx's ReadTimeout while streaming it
        rec["timeout"] = "Timeout" in type(e).__name__
    return rec


class LoopLag:
    """Measures how late the client's event loop wakes up (a busy client delays every timestamp it takes)."""

    def __init__(self, period_s: float = 0.02):
        self.period, self.lags, self.task = period_s, [], None

    async def _tick(self):
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.lags.append(time.perf_counter() - t - self.period)

    def __enter__(self):
        self.task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc):
        self.task.cancel()


async def run_level(
    cfg,
    level: float,
    base_url: str,
    api_key: str,
    models: list[str],
    prompts: list,
    records: list,
    tokenizer=None,
    on_done=None,
    target: str | None = None,
    seen: set | None = None,
    prompt_offset: int = 0,
) -> dict:
    """Run one load level; finished requests are appended to `records` as they complete (so an interrupted run
    keeps them); `seen`: the prompts the run sent so far (a repeat is marked); `prompt_offset`: where `prompts`
    starts in the run's prompt list (each record names its prompt's index there). Returns {wall_s, client figures}."""
    import numpy as np

    from .loads import PROFILES

    profile = PROFILES[cfg.mode]
    # the client's connection pool must never be the limit, or an open-loop load would quietly queue inside it
    concurrency = profile.max_in_flight(cfg, level)
    client = make_client(base_url, api_key, concurrency or cfg.requests, cfg.timeout_s)
    rng = np.random.default_rng(cfg.seed)
    t_origin = time.perf_counter()
    n_max = max(cfg.requests, profile.requests(cfg, level))
    drawn = np.random.default_rng(cfg.seed + 1).integers(len(models), size=n_max + cfg.warmup)

    def model_for(i: int) -> str:  # warmup requests have negative indexes
        return models[i % len(models)] if cfg.assign == "round_robin" else models[int(drawn[i])]

    async def send(i: int, sem: asyncio.Semaphore | None, keep: bool):
        async def go():
            prompt = prompts[i % len(prompts)]
            key = json.dumps(prompt, sort_keys=True)
            repeat = seen is not None and key in seen
            if seen is not None:
                seen.add(key)
            rec = await one_request(client, model_for(i), prompt, cfg, t_origin, tokenizer)
            rec.update(i=i, level=level, target=target, repeat=repeat, prompt=(i + prompt_offset) % len(prompts))
            if keep:
                records.append(rec)
            if on_done:
                on_done()

        if sem is None:
            await go()
        else:
            async with sem:
                await go()

    try:
        if cfg.warmup:
            sem = asyncio.Semaphore(max(1, min(cfg.warmup, concurrency or cfg.warmup)))
            await asyncio.gather(*(send(-1 - k, sem, False) for k in range(cfg.warmup)))
        # the server's own histograms (vLLM's /metrics) just before and after the measured requests
        metrics_before = await asyncio.to_thread(S.scrape, base_url, api_key)
        deadline = None if cfg.duration_s is None else time.perf_counter() + cfg.duration_s
        cpu0, t0 = time.process_time(), time.perf_counter()
        first = len(records)
        tasks: list[asyncio.Future] = []
        with LoopLag() as lag:
            try:
                await profile.schedule(cfg, level, rng, deadline, send, tasks)
                await asyncio.gather(*tasks)
            except asyncio.CancelledError:  # Ctrl-C: stop what is in flight, keep what finished
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        metrics_after = await asyncio.to_thread(S.scrape, base_url, api_key) if metrics_before else None
        n = max(len(records) - first, 1)
        lags = np.asarray(lag.lags or [0.0])
        return {
            "wall_s": wall,
            "server_metrics": (metrics_before, metrics_after),
            "client": {
                "cpu_ms_per_request": 1000 * cpu / n,
                "cpu_share_of_wall": cpu / wall if wall else 0,
                "loop_lag_p50_ms": 1000 * float(np.percentile(lags, 50)),
                "loop_lag_p99_ms": 1000 * float(np.percentile(lags, 99)),
                "loop_lag_max_ms": 1000 * float(lags.max()),
            },
        }
    finally:
        await client.close()


def preflight(base_url: str, api_key: str, models: list[str], timeout_s: float = 10) -> list[str]:
    """Before any load: the endpoint answers, the key is accepted, and the models are served (when the server
    lists its models). Returns the served model ids. Raises FtxError with one clear line otherwise."""
    import json
    import urllib.error
    import urllib.request

    from ..core.errors import FtxError

    url = base_url.rstrip("/") + "/models"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            served = [m.get("id") for m in json.loads(r.read().decode()).get("data", [])]
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise FtxError(
                f"endpoint {base_url} rejected the API key (HTTP {e.code}); set --api-key or FTX_API_KEY"
            ) from None
        if e.code == 404:
            return []  # no /models route: nothing to check against
        raise FtxError(f"endpoint {base_url}: GET /models answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise FtxError(f"endpoint {base_url} is not reachable ({reason})") from None
    missing = [m for m in models if served and m not in served]
    if missing:
        raise FtxError(
            f"endpoint {base_url} does not serve {', '.join(map(repr, missing))} (it serves: {', '.join(served)})"
        )
    return served
