"""Bench outputs: records.jsonl, summary.json, summary.md (also the run card's bench section), compare.md,
latency_cdf.png and sweep.png (throughput and P99 latency against the load)."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.cache import atomic_write_text, write_json

COMPARE = (
    ("output tok/s", "output_tokens_per_s", False),
    ("req/s", "request_throughput", False),
    ("goodput req/s", ("goodput", "requests_per_s"), False),
    ("TTFT P50 ms", ("ttft_s", "p50"), True),
    ("TTFT P99 ms", ("ttft_s", "p99"), True),
    ("TPOT P99 ms", ("tpot_s", "p99"), True),
    ("E2E P99 ms", ("e2e_s", "p99"), True),
    ("errors", "errors", False),
)


def _get(summary: dict, key):
    if isinstance(key, tuple):
        v = summary.get(key[0]) or {}
        return v.get(key[1])
    return summary.get(key)


def _ms(v) -> str:
    return "—" if v is None else f"{1000 * v:.0f}"


def _num(v, fmt="{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def _usd(v) -> str:
    if v is None:
        return "—"
    return f"${v:,.4f}" if v < 1 else f"${v:,.2f}"


def _tokens(v) -> str:
    if v is None:
        return "never"
    for unit, d in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= d:
            return f"{v / d:,.1f}{unit}"
    return f"{v:.0f}"


def _share(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def level_name(mode: str) -> str:
    from .loads import PROFILES

    return PROFILES[mode].level_name


def levels_table(mode: str, levels: list[dict]) -> str:
    head = (
        f"| {level_name(mode)} | req/s | output tok/s | TTFT P50 / P99 ms | TPOT P50 / P99 ms | ITL P99 ms "
        "| E2E P50 / P99 ms | errors | goodput req/s (good %) | SLO | prompt cached |"
    )
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for lv in levels:
        s = lv["summary"]
        g = s["goodput"]
        lines.append(
            f"| {lv['level']:g}{' (cut short)' if lv.get('partial') else ''} | {s['request_throughput']:.2f} "
            f"| {s['output_tokens_per_s']:.1f} | {_ms(s['ttft_s']['p50'])} / {_ms(s['ttft_s']['p99'])} "
            f"| {_ms(s['tpot_s']['p50'])} / {_ms(s['tpot_s']['p99'])} | {_ms(s['itl_s']['p99'])} "
            f"| {_ms(s['e2e_s']['p50'])} / {_ms(s['e2e_s']['p99'])} | {s['errors']}/{s['requests']} "
            f"| {g['requests_per_s']:.2f} ({100 * g['good_fraction']:.0f}%) "
            f"| {'meets' if s['meets_slo'] else 'misses'} | {_share(s.get('cached_share'))} |"
        )
    return "\n".join(lines)


def server_table(mode: str, levels: list[dict]) -> str | None:
    """ftx's mean TTFT/TPOT/E2E beside the server's own (ftx.bench.server), per level that has them."""
    rows = [lv for lv in levels if lv.get("server")]
    if not rows:
        return None

    def cell(lv, m):
        c, s = (lv["summary"].get(m) or {}).get("mean"), lv["server"].get(m)
        if c is None or not s:
            return "-"
        return f"{1000 * c:.1f} / {1000 * s:.1f} ({100 * (c / s - 1):+.1f}%)"

    out = [
        f"Server's own timings ({rows[0]['server']['source']}), ftx / server:",
        "",
        f"| {level_name(mode)} | requests | TTFT vs prefill ms | TPOT ms | E2E ms |",
        "|---|---|---|---|---|",
    ]
    for lv in rows:
        n = f"{lv['summary']['ok']} / {lv['server']['requests']}"
        out.append(f"| {lv['level']:g} | {n} | {cell(lv, 'ttft_s')} | {cell(lv, 'tpot_s')} | {cell(lv, 'e2e_s')} |")
    return "\n".join(out)


def slo_line(slo: dict) -> str:
    parts = [
        f"{k.removesuffix('_ms').upper()} ≤ {v:g} ms" for k, v in slo.items() if k.endswith("_ms") and v is not None
    ]
    return (
        f"SLO: P{slo['percentile']:g} of {', '.join(parts)}, error rate ≤ {100 * slo['max_error_rate']:g}%; "
        "goodput counts the requests that met every limit."
    )


def compare_rows(per_target: list[dict]) -> list[dict]:
    """Side by side at each level both targets ran, with ratios target / first target."""
    base = per_target[0]
    rows = []
    for lv in base["levels"]:
        row = {"level": lv["level"], "targets": {}}
        for t in per_target:
            other = next((x for x in t["levels"] if x["level"] == lv["level"]), None)
            if other is None:
                continue
            vals = {label: _get(other["summary"], key) for label, key, _ in COMPARE}
            ratios = {
                label: (v / b if isinstance(v, (int, float)) and isinstance(b, (int, float)) and b else None)
                for (label, key, _), v, b in zip(
                    COMPARE, vals.values(), [_get(lv["summary"], k) for _, k, _ in COMPARE]
                )
            }
            row["targets"][t["name"]] = {"values": vals, "ratio_to_first": ratios}
        rows.append(row)
    return rows


def compare_table(mode: str, rows: list[dict]) -> str:
    names = list(rows[0]["targets"]) if rows else []
    if len(names) < 2:
        return ""
    first = names[0]
    cols = ["level", "metric", *names, *[f"{n} / {first}" for n in names[1:]]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        for label, _, is_time in COMPARE:
            vals = [row["targets"].get(n, {}).get("values", {}).get(label) for n in names]
            shown = [(_ms(v) if is_time else _num(v, "{:.2f}")) for v in vals]
            ratios = [row["targets"].get(n, {}).get("ratio_to_first", {}).get(label) for n in names[1:]]
            lines.append(
                f"| {row['level']:g} | {label} | "
                + " | ".join(shown)
                + " | "
                + " | ".join(_num(r, "{:.3f}x") for r in ratios)
                + " |"
            )
    return f"Load: {level_name(mode)}; ratios are each target over `{first}`.\n\n" + "\n".join(lines)


def cost_section(result: dict) -> str:
    own = result.get("cost")
    best = result.get("best")
    if not best:
        return "No load level met the SLO: no goodput to price."
    if not own:
        return ""
    g = best["summary"]["goodput"]
    out = [
        f"Cost at the highest load meeting the SLO ({level_name(result['mode'])} {best['level']:g}: "
        f"{g['input_tokens_per_s'] + g['output_tokens_per_s']:.1f} good tokens/s, "
        f"{100 * own['input_share']:.0f}% of them input) on `{own['hardware']}` ({own['kind']}, "
        f"prices as of {own['hardware_as_of']}) at {100 * own['utilization']:.0f}% utilisation: "
        f"{_usd(own['monthly_cost_usd'])}/month for {_tokens(own['tokens_per_month'])} tokens → "
        f"**{_usd(own['usd_per_1m_tokens'])} per 1M tokens** at this mix "
        f"({_usd(own['usd_per_1m_input'])} per 1M input, {_usd(own['usd_per_1m_output'])} per 1M output; "
        f"prefill is {100 * own['prefill_time_share']:.0f}% of request time).",
        "",
    ]
    if result.get("apis"):
        out += [
            "| API | $ / 1M in | $ / 1M out | $ / 1M at this mix | API cost of the same month | API / self-hosted "
            "| break-even volume / month | as of |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for a in result["apis"]:
            be = _tokens(a["break_even_tokens_per_month"])
            if a["break_even_tokens_per_month"] is not None and not a["break_even_reachable"]:
                be += " (beyond this machine's capacity)"
            out.append(
                f"| {a['api']} | {_usd(a['input_usd_per_1m'])} | {_usd(a['output_usd_per_1m'])} "
                f"| {_usd(a['blended_usd_per_1m'])} | {_usd(a['api_monthly_cost_usd'])} "
                f"| {_num(a['api_over_self_hosted'], '{:.2f}x')} | {be} | {a['as_of']} |"
            )
        out.append("")
        out.append("Formulas: docs/bench_cost.md. API prices: bench/api_prices.yaml (source and date per row).")
    return "\n".join(out)


def markdown(result: dict) -> str:
    parts = []
    for t in result["targets"]:
        title = f"`{t['name']}`" + (
            f" (models: {', '.join(t['models'])})" if t["models"] not in ([], [t["name"]]) else ""
        )
        parts += [f"**{title}**", "", levels_table(result["mode"], t["levels"]), ""]
        own = server_table(result["mode"], t["levels"])
        if own:
            parts += [own, ""]
    parts += [slo_line(result["slo"]), ""]
    if result.get("compare"):
        parts += [compare_table(result["mode"], result["compare"]), ""]
    cost = cost_section(result)
    if cost:
        parts += [cost, ""]
    c = next((lv["client"] for lv in reversed(result["targets"][0]["levels"]) if lv.get("client")), None)
    if c:
        parts.append(
            f"Client (ftx's own process) at the last level: {100 * c['cpu_share_of_wall']:.0f}% of one core, "
            f"{c['cpu_ms_per_request']:.1f} ms CPU per request, event-loop lag P99 "
            f"{c['loop_lag_p99_ms']:.1f} ms."
        )
    p = result.get("prompts") or {}
    if p.get("seed") is not None:
        parts.append(f"Synthetic prompts, seed {p['seed']} (other prompts at every level and target).")
    parts += [f"**Warning:** {w}" for w in result.get("warnings") or []]
    if result.get("interrupted"):
        parts.append("**Interrupted (Ctrl-C): these are the requests that finished.**")
    return "\n".join(parts).strip() + "\n"


def plot_cdf(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    groups = sorted({(r.get("target"), r.get("level")) for r in records}, key=lambda k: (str(k[0]), k[1] or 0))
    for target, level in groups:
        vals = np.sort(
            [r["e2e_s"] for r in records if r["ok"] and r.get("target") == target and r.get("level") == level]
        )
        if len(vals):
            label = f"{target + ' ' if target and len({g[0] for g in groups}) > 1 else ''}load {level:g}"
            ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post", label=f"E2E, {label}")
    ttft = np.sort([r["ttft_s"] for r in records if r["ok"] and r["ttft_s"] is not None])
    if len(ttft):
        ax.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), where="post", linestyle="--", label="TTFT, all")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def plot_sweep(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for t in result["targets"]:
        xs = [lv["level"] for lv in t["levels"]]
        a1.plot(xs, [lv["summary"]["output_tokens_per_s"] for lv in t["levels"]], marker="o", label=t["name"])
        a2.plot(
            xs,
            [1000 * (lv["summary"]["e2e_s"]["p99"] or 0) for lv in t["levels"]],
            marker="o",
            label=f"{t['name']} E2E P99",
        )
        a2.plot(
            xs,
            [1000 * (lv["summary"]["ttft_s"]["p99"] or 0) for lv in t["levels"]],
            marker="x",
            linestyle="--",
            label=f"{t['name']} TTFT P99",
        )
    for ax, ylabel in ((a1, "output tokens/s"), (a2, "latency (ms)")):
        ax.set_xlabel(level_name(result["mode"]))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    slo = result["slo"]
    if slo.get("ttft_ms"):
        a2.axhline(slo["ttft_ms"], color="grey", linewidth=0.8, linestyle=":")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def write(out: Path, cfg, result, records: list[dict]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    data = json.loads(result.model_dump_json())
    write_json(out / "summary.json", {**data, "config": json.loads(cfg.model_dump_json())})
    atomic_write_text(out / "summary.md", markdown(data))
    if data.get("compare"):
        atomic_write_text(out / "compare.md", compare_table(data["mode"], data["compare"]) + "\n")
    if any(r["ok"] for r in records):
        plot_cdf(records, out / "latency_cdf.png")
    if max(len(t["levels"]) for t in data["targets"]) > 1:
        plot_sweep(data, out / "sweep.png")


def headline_goodput(summary: dict) -> float:
    """Tokens/s (input + output) a machine serves within the SLO: goodput at the highest level meeting it; if
    no level meets it, the total tokens/s of the last level."""
    best = summary.get("best")
    if best:
        g = best["summary"]["goodput"]
        return g["input_tokens_per_s"] + g["output_tokens_per_s"]
    return summary["targets"][0]["levels"][-1]["summary"]["total_tokens_per_s"]


def lora_break_even_md(be: dict) -> str:
    r = be["ratio"]
    lines = [
        f"**Merged models vs one multi-LoRA server** (same traffic): a machine serves "
        f"{be['merged_tokens_per_s']:.1f} tokens/s with a merged model and "
        f"{be['multi_lora_tokens_per_s']:.1f} with the adapters (r = {r:.3f}). With N fine-tunes, merged "
        f"needs one deployment each; multi-LoRA needs fewer machines while each adapter's traffic is below "
        f"r × a machine = {be['break_even_traffic_per_adapter_tokens_per_s']:.1f} tokens/s "
        f"({_tokens(be['break_even_tokens_per_month_per_adapter'])} tokens/month); above that, merged "
        f"deployments cost {1 / r:.2f}x less per token."
        if r
        else "",
        "",
        "| adapters | traffic per adapter (share of a machine) | machines merged | machines multi-LoRA "
        + ("| $/month merged | $/month multi-LoRA |" if be["machine_usd_per_month"] else "|"),
        "|---:|---:|---:|---:|" + ("---:|---:|" if be["machine_usd_per_month"] else ""),
    ]
    for row in be["rows"]:
        line = (
            f"| {row['adapters']} | {row['traffic_per_adapter_tokens_per_s']:.1f} tok/s "
            f"({100 * row['traffic_per_adapter_share_of_machine']:.0f}%) | {row['machines_merged']} "
            f"| {row['machines_multi_lora']} |"
        )
        if be["machine_usd_per_month"]:
            line += f" {_usd(row['monthly_usd_merged'])} | {_usd(row['monthly_usd_multi_lora'])} |"
        lines.append(line)
    if be["hardware"]:
        lines.append(f"\nMachine: `{be['hardware']}`, {_usd(be['machine_usd_per_month'])}/month always on.")
    return "\n".join(lines)


def compare_dirs(dirs: list[Path], names: list[str] | None, lora_break_even: bool, hardware: str | None) -> str:
    """`ftx bench compare`: saved results side by side (summary.json of each directory), ratios to the first;
    `lora_break_even`: the first a merged model, the second a multi-LoRA server on the same traffic."""
    from ..core.errors import FtxError
    from . import cost

    labels = names or [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise FtxError("--names needs one name per directory")
    summaries = []
    for d in dirs:
        if not (d / "summary.json").is_file():
            raise FtxError("no summary.json here (not a bench result directory)", where=str(d))
        summaries.append(json.loads((d / "summary.json").read_text()))
    per_target = [{**s["targets"][0], "name": n} for s, n in zip(summaries, labels)]
    text = compare_table(summaries[0]["mode"], compare_rows(per_target))
    if lora_break_even:
        if len(dirs) != 2:
            raise FtxError("--lora-break-even compares two results: merged, then multi-LoRA")
        g = [headline_goodput(s) for s in summaries]
        hw = cost.load_hardware(hardware) if hardware else None
        text += (
            "\n\nTokens/s per machine: goodput at the highest load meeting the SLO (else the last level's "
            "throughput).\n\n" + lora_break_even_md(cost.lora_break_even(g[0], g[1], hw))
        )
    return text
