"""Summary statistics of one load level: latency distributions, throughput, errors, goodput at an SLO.

Definitions (per request, from its streamed chunks):
  TTFT  time to the first content token            E2E   time to the last byte
  ITL   gaps between consecutive content chunks    TPOT  (E2E - TTFT) / (output tokens - 1)
Goodput (DistServe's definition, also `vllm bench serve --goodput`): the throughput of the requests that met
every per-request limit of the SLO. A load level *meets* the SLO when the SLO's percentile (default P99) of
each limited metric is within its limit and the error rate is within `max_error_rate`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

PCTS = (50, 90, 95, 99)
METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")


class SLO(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_ms: float | None = Field(1000, gt=0, description="time to first token limit")
    tpot_ms: float | None = Field(100, gt=0, description="time per output token limit")
    e2e_ms: float | None = Field(None, gt=0, description="end-to-end latency limit")
    percentile: float = Field(99, gt=0, le=100, description="a load level meets the SLO at this percentile")
    max_error_rate: float = Field(0.0, ge=0, le=1)

    def limits_s(self) -> dict[str, float]:
        return {
            m: v / 1000
            for m, v in (("ttft_s", self.ttft_ms), ("tpot_s", self.tpot_ms), ("e2e_s", self.e2e_ms))
            if v is not None
        }


def distribution(values: list[float]) -> dict:
    """mean, std and P50/P90/P95/P99 (numpy's linear interpolation); None when there are no values."""
    import numpy as np

    if not values:
        return {"n": 0, "mean": None, "std": None, **{f"p{p}": None for p in PCTS}}
    a = np.asarray(values, dtype=float)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std()),
        **{f"p{p}": float(np.percentile(a, p)) for p in PCTS},
    }


def good(record: dict, slo: SLO) -> bool:
    """Did this request succeed and meet every per-request limit?"""
    if not record["ok"]:
        return False
    for metric, limit in slo.limits_s().items():
        v = record.get(metric)
        if metric == "tpot_s" and v is None:  # a single output token has no TPOT: nothing to violate
            continue
        if v is None or v > limit:
            return False
    return True


def summarize(records: list[dict], wall_s: float, slo: SLO) -> dict:
    """One load level's figures from its request records."""
    import numpy as np

    ok = [r for r in records if r["ok"]]
    good_recs = [r for r in ok if good(r, slo)]
    n = len(records)
    out_tok = sum(r["output_tokens"] or 0 for r in ok)
    in_tok = sum(r["input_tokens"] or 0 for r in ok)
    per_s = (lambda x: x / wall_s) if wall_s > 0 else (lambda x: 0.0)
    dists = {m: distribution([r[m] for r in ok if r.get(m) is not None]) for m in ("ttft_s", "tpot_s", "e2e_s")}
    dists["itl_s"] = distribution([g for r in ok for g in (r.get("itl_s") or [])])
    pct = slo.percentile
    checks = {}
    for metric, limit in slo.limits_s().items():
        vals = [r[metric] for r in ok if r.get(metric) is not None]
        at = float(np.percentile(vals, pct)) if vals else None
        checks[metric] = {"value": at, "limit": limit, "ok": at is not None and at <= limit}
    error_rate = (n - len(ok)) / n if n else 0.0
    checks["error_rate"] = {"value": error_rate, "limit": slo.max_error_rate, "ok": error_rate <= slo.max_error_rate}
    sources = {r.get("token_source") for r in ok}
    told = [r for r in ok if r.get("cached_tokens") is not None]  # the records whose server reported it
    return {
        "requests": n,
        "ok": len(ok),
        "errors": n - len(ok),
        "error_rate": error_rate,
        "timeouts": sum(1 for r in records if r.get("timeout")),
        "wall_s": wall_s,
        **dists,
        "input_tokens": in_tok,
        "cached_input_tokens": sum(r["cached_tokens"] for r in told) if told else None,
        "cached_share": _share(told),
        "repeated_prompts": sum(1 for r in records if r.get("repeat")),
        # of the requests repeating a prompt of the run, the share of their prompt tokens the server had cached
        "repeat_cached_share": _share([r for r in told if r.get("repeat")]),
        "output_tokens": out_tok,
        "request_throughput": per_s(len(ok)),
        "output_tokens_per_s": per_s(out_tok),
        "total_tokens_per_s": per_s(in_tok + out_tok),
        "goodput": {
            "requests": len(good_recs),
            "good_fraction": len(good_recs) / n if n else 0.0,
            "requests_per_s": per_s(len(good_recs)),
            "output_tokens_per_s": per_s(sum(r["output_tokens"] or 0 for r in good_recs)),
            "input_tokens_per_s": per_s(sum(r["input_tokens"] or 0 for r in good_recs)),
            # prefill's share of the good requests' time: splits a cost between input and output
            "prefill_time_share": (
                sum(r["ttft_s"] for r in good_recs) / sum(r["e2e_s"] for r in good_recs)
                if good_recs and sum(r["e2e_s"] for r in good_recs) > 0
                else None
            ),
        },
        "slo_checks": checks,
        "meets_slo": all(c["ok"] for c in checks.values()) and len(ok) > 0,
        "token_source": sources.pop() if len(sources) == 1 else ("mixed" if sources else "none"),
    }


def _share(records: list[dict]) -> float | None:
    n = sum(r["input_tokens"] or 0 for r in records)
    return sum(r["cached_tokens"] for r in records) / n if n else None


MOSTLY_CACHED = 0.9  # beyond a shared system prompt: prompts the server has seen whole


def cache_warnings(per_target: list[dict]) -> list[str]:
    """One line per level whose figures are warm-cache ones: requests that repeat a prompt sent earlier in the run
    and that the server answered from its cache (or did not say), or prompt tokens almost all from the server's cache
    (prompts an earlier run sent)."""
    out = []
    for t in per_target:
        for lv in t["levels"]:
            s = lv["summary"]
            share = s.get("cached_share")
            cached = f" ({100 * share:.0f}% of the prompt tokens came from its cache)" if share is not None else ""
            where = f"{t['name']} at {lv['level']:g}"
            repeat_share = s.get("repeat_cached_share")
            if s.get("repeated_prompts") and (repeat_share is None or repeat_share > MOSTLY_CACHED):
                out.append(
                    f"{where}: {s['repeated_prompts']} of {s['requests']} requests repeat a prompt sent earlier in "
                    f"this run, which the server may answer from its prompt cache{cached}: give more prompts than "
                    "the run sends, or use synthetic ones"
                )
            elif share is not None and share > MOSTLY_CACHED:
                out.append(
                    f"{where}: {100 * share:.0f}% of the prompt tokens came from the server's prompt cache, so TTFT "
                    "and throughput are warm-cache figures (prompts an earlier run sent; synthetic prompts are fresh "
                    "per run unless prompts.seed is set)"
                )
    return out


def best_level(levels: list[dict]) -> dict | None:
    """The highest load level that meets the SLO (None if none does)."""
    passing = [lv for lv in levels if lv["summary"]["meets_slo"]]
    return max(passing, key=lambda lv: lv["level"]) if passing else None
