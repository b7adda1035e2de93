"""The server's own timings of a load level, beside the client's: does ftx measure what the server measured?

- llama-server sends `timings` with every response: prompt_ms (the slot's start to the first token: prefill),
  predicted_ms over predicted_n - 1 decode steps. They are kept per request (record["server"]).
- vLLM keeps Prometheus histograms on /metrics: time to first token (from the request's arrival), time per output
  token (decode time / (n - 1), per request) and end-to-end latency. /metrics is read just before and just after
  a level's measured requests; each mean is the difference of the sums over the difference of the counts.

`agreement` sets ftx's means beside the server's: client / server, 1.0 when they agree. What the server cannot
see (connect, HTTP, the client's event loop; for llama-server also the wait for a slot's next batch) makes the
client's TTFT and E2E longer.
"""

from __future__ import annotations

VLLM = {
    "ttft_s": "vllm:time_to_first_token_seconds",
    "tpot_s": "vllm:request_time_per_output_token_seconds",
    "e2e_s": "vllm:e2e_request_latency_seconds",
}
METRICS = ("ttft_s", "tpot_s", "e2e_s")


def record_timings(t: dict) -> dict | None:
    """One llama-server response's `timings` as seconds: prefill, decode time per token (TPOT), prefill + decode."""
    try:
        prompt_ms, gen_ms, n = float(t["prompt_ms"]), float(t["predicted_ms"]), int(t["predicted_n"])
    except (KeyError, TypeError, ValueError):
        return None
    return {
        "ttft_s": prompt_ms / 1000,
        "tpot_s": gen_ms / 1000 / (n - 1) if n > 1 else None,
        "e2e_s": (prompt_ms + gen_ms) / 1000,
        "prompt_tokens": t.get("prompt_n"),
        "cached_tokens": t.get("cache_n"),
        "output_tokens": n,
    }


def metrics_url(base_url: str) -> str:
    root = base_url.rstrip("/")
    return (root[: -len("/v1")] if root.endswith("/v1") else root) + "/metrics"


def scrape(base_url: str, api_key: str | None = None, timeout_s: float = 5) -> dict | None:
    """vLLM's latency histograms as {metric: (sum, count)} (summed over label sets); None when the endpoint has no
    vLLM metrics (llama-server, the ftx gateway, an API)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(metrics_url(base_url), headers={"Authorization": f"Bearer {api_key or 'none'}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    wanted = {v: k for k, v in VLLM.items()}
    out = {k: [0.0, 0.0] for k in VLLM}
    for fam in text_string_to_metric_families(text):
        key = wanted.get(fam.name)
        for s in fam.samples if key else ():
            if s.name == fam.name + "_sum":
                out[key][0] += s.value
            elif s.name == fam.name + "_count":
                out[key][1] += s.value
    if not any(c for _, c in out.values()) and "vllm:" not in text:
        return None
    return {k: tuple(v) for k, v in out.items()}


def view(records: list[dict], before: dict | None, after: dict | None) -> dict | None:
    """The server's mean TTFT, TPOT and E2E over a level's successful requests, or None when it told nothing."""
    timed = [r["server"] for r in records if r.get("ok") and r.get("server")]
    if timed:

        def mean(m):
            vals = [t[m] for t in timed if t.get(m) is not None]
            return sum(vals) / len(vals) if vals else None

        return {"source": "llama-server timings", "requests": len(timed), **{m: mean(m) for m in METRICS}}
    if before is None or after is None:
        return None
    d = {m: (after[m][0] - before[m][0], after[m][1] - before[m][1]) for m in METRICS}
    if d["e2e_s"][1] <= 0:
        return None
    return {
        "source": "vLLM /metrics",
        "requests": int(d["e2e_s"][1]),
        **{m: (s / c if c > 0 else None) for m, (s, c) in d.items()},
    }


def agreement(summary: dict, server: dict | None) -> dict | None:
    """client mean / server mean per metric, and whether both counted the same requests."""
    if not server:
        return None
    out = {}
    for m in METRICS:
        c, s = (summary.get(m) or {}).get("mean"), server.get(m)
        out[m] = c / s if c is not None and s else None
    out["same_requests"] = server["requests"] == summary.get("ok")
    return out
