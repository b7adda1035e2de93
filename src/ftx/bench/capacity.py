"""Capacity plan from measured bench results: `ftx bench plan --results DIR[@HARDWARE] ... --rps R [--ttft-ms ...]`.

For each bench result (one server on one hardware profile) the SLO is applied again to its recorded requests, level
by level (ftx.bench.stats: the SLO's percentile of each limited metric, the error rate). A replica's capacity is
the goodput (requests/s that met every limit) of the highest load level that meets the SLO; nothing is
extrapolated beyond what was measured.

    replicas  = ceil(R * (1 + headroom) / capacity)
    load      = R / (replicas * capacity)             (each replica's share of its measured capacity)
    $/month   = replicas * (F + e * load * 730 h)     (F, e: ftx.bench.cost; cloud: e = 0)
    $ per 1M tokens = $/month / (R * tokens per good request * 3600 * 730) * 1e6
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.errors import FtxError
from .cost import HOURS_PER_MONTH, load_hardware
from .stats import SLO, summarize


def _records(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "records.jsonl").read_text().splitlines() if line.strip()]


def capacity(d: Path, slo: SLO | None = None) -> dict:
    """The measured capacity of one bench result directory under `slo` (default: the SLO it was run with)."""
    if not (d / "summary.json").is_file() or not (d / "records.jsonl").is_file():
        raise FtxError(f"{d}: not a bench result (summary.json and records.jsonl)")
    summary = json.loads((d / "summary.json").read_text())
    slo = slo or SLO(**summary["slo"])
    target = summary["targets"][0]
    records = [r for r in _records(d) if r.get("target") in (None, target["name"])]
    levels = []
    for lv in target["levels"]:
        recs = [r for r in records if r["level"] == lv["level"]]
        s = summarize(recs, lv["summary"]["wall_s"], slo)
        good = [r for r in recs if r["ok"]]
        tokens = sum((r["input_tokens"] or 0) + (r["output_tokens"] or 0) for r in good) / len(good) if good else 0
        levels.append(
            {
                "level": lv["level"],
                "meets_slo": s["meets_slo"],
                "goodput_rps": s["goodput"]["requests_per_s"],
                "tokens_per_request": tokens,
            }
        )
    passing = [lv for lv in levels if lv["meets_slo"]]
    best = max(passing, key=lambda lv: lv["level"]) if passing else None
    return {"dir": str(d), "name": target["name"], "levels": levels, "best": best, "slo": slo.model_dump()}


def hardware_of(d: Path, given: str | None):
    if given:
        return load_hardware(given)
    summary = json.loads((d / "summary.json").read_text())
    hw = (summary.get("config") or {}).get("hardware") or (summary.get("cost") or {}).get("hardware")
    if not hw:
        raise FtxError(f"{d}: no hardware profile recorded; give one: --results {d}@PROFILE")
    return load_hardware(hw)


def plan(results: list[str], rps: float, slo: SLO | None = None, headroom: float = 0.2) -> list[dict]:
    """One row per result: replicas for `rps` at the SLO and the monthly cost, cheapest first (those that cannot
    meet the SLO at any measured level last, with the reason)."""
    if rps <= 0:
        raise FtxError(f"--rps must be > 0 (got {rps})")
    rows = []
    for spec in results:
        path, _, hw_name = spec.partition("@")
        d = Path(path)
        cap = capacity(d, slo)
        hw = hardware_of(d, hw_name or None)
        row = {"result": str(d), "server": cap["name"], "hardware": hw.name, "slo": cap["slo"], "levels": cap["levels"]}
        best = cap["best"]
        if best is None or best["goodput_rps"] <= 0:
            rows.append({**row, "replicas": None, "why": "no measured load level meets the SLO"})
            continue
        per = best["goodput_rps"]
        replicas = math.ceil(rps * (1 + headroom) / per)
        load = rps / (replicas * per)
        monthly = replicas * (hw.fixed_per_month() + hw.energy_per_busy_hour() * load * HOURS_PER_MONTH)
        tokens = rps * best["tokens_per_request"] * 3600 * HOURS_PER_MONTH
        rows.append(
            {
                **row,
                "level": best["level"],
                "replica_goodput_rps": per,
                "replicas": replicas,
                "load": load,
                "usd_per_month": monthly,
                "usd_per_1m_tokens": monthly / tokens * 1e6 if tokens else None,
            }
        )
    return sorted(rows, key=lambda r: (r["replicas"] is None, r.get("usd_per_month") or 0))


def markdown(rows: list[dict], rps: float, headroom: float) -> str:
    slo = rows[0]["slo"] if rows else {}
    limits = ", ".join(f"{k.removesuffix('_ms').upper()} ≤ {v:g} ms" for k, v in slo.items() if k.endswith("_ms") and v)
    out = [
        f"Capacity plan: {rps:g} requests/s with {100 * headroom:.0f}% headroom, P{slo.get('percentile', 99):g} of "
        f"{limits or 'no latency limit'} (measured goodput per replica; nothing extrapolated)",
        "",
        "| hardware | bench result | load level | goodput/replica (req/s) | replicas | load | $/month | $/1M tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["replicas"] is None:
            out.append(f"| {r['hardware']} | {r['result']} | — | — | — | — | — | {r['why']} |")
            continue
        per_m = "—" if r["usd_per_1m_tokens"] is None else f"{r['usd_per_1m_tokens']:.3f}"
        out.append(
            f"| {r['hardware']} | {r['result']} | {r['level']:g} | {r['replica_goodput_rps']:.2f} | {r['replicas']} | "
            f"{100 * r['load']:.0f}% | {r['usd_per_month']:,.0f} | {per_m} |"
        )
    return "\n".join(out)


def command(results: list[str], rps: float, limits_ms: tuple, percentile: float, headroom: float, out=None) -> str:
    """`ftx bench plan`: the plan as markdown (and JSON into `out`); FtxError when no result meets the SLO."""
    from ..core.cache import atomic_write_text

    ttft, tpot, e2e = limits_ms
    slo = SLO(ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e, percentile=percentile) if any(limits_ms) else None
    rows = plan(results, rps, slo, headroom)
    text = markdown(rows, rps, headroom)
    if out:
        atomic_write_text(Path(out), json.dumps(rows, indent=2) + "\n")
    if all(r["replicas"] is None for r in rows):
        print(text)
        raise FtxError("no bench result meets the SLO at any measured load level: relax the SLO or bench more levels")
    return text
