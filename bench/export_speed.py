"""Export speed: merged HF model -> f16 GGUF -> Q4_K_M through ftx, against the same converter and quantizer
invoked by hand, in one run (rounds alternate ftx, hand, ftx, hand). Then the full ftx export of the same model
with its quality table (size, PPL ratio, KL divergence, top-1).

Needs a merged model: the quickstart's (`make quickstart` first) or --merged DIR.
Prints tables and writes bench/results/export_speed.json; headline `ratio` = median ftx/hand wall time
(target <= 1.2).

    .venv/bin/python bench/export_speed.py [--rounds 2] [--merged runs/quickstart/latest/merged]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def by_hand(merged: Path, out: Path) -> None:
    """What a user types following llama.cpp's README."""
    from ftx import llamacpp

    subprocess.run(
        [
            sys.executable,
            str(llamacpp.converter("hf")),
            str(merged),
            "--outfile",
            str(out / "f16.gguf"),
            "--outtype",
            "f16",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [str(llamacpp.tool("llama-quantize")), str(out / "f16.gguf"), str(out / "q4_k_m.gguf"), "Q4_K_M"],
        check=True,
        capture_output=True,
    )


def with_ftx(merged: Path, out: Path) -> None:
    from ftx import export

    export.convert_hf(merged, out / "model-f16.gguf", "f16", "bench")
    export.quantize(out / "model-f16.gguf", out / "model-q4_k_m.gguf", "q4_k_m")


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from ftx import export
    from ftx.util import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--merged", type=Path, default=ROOT / "runs" / "quickstart" / "latest" / "merged")
    args = ap.parse_args()
    merged = args.merged.resolve()
    if not (merged / "config.json").exists():
        sys.exit(f"no merged model at {merged}: run `make quickstart` first or pass --merged DIR")
    times = {"ftx": [], "hand": []}
    for _ in range(args.rounds):
        for kind, fn in (("ftx", with_ftx), ("hand", by_hand)):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                fn(merged, Path(d))
                times[kind].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["ftx"], times["hand"])]
    console = Console()
    t = Table(title="merged -> f16 GGUF -> Q4_K_M, wall seconds")
    for col in ("path", "median s", "rounds"):
        t.add_column(col)
    for k, v in times.items():
        t.add_row(k, f"{statistics.median(v):.1f}", ", ".join(f"{x:.1f}" for x in v))
    t.add_row("ratio ftx/hand (headline)", f"{statistics.median(ratios):.3f}", "")
    console.print(t)

    val = ROOT / "runs" / "quickstart" / "latest" / "stages" / "data" / "val.jsonl"
    held = val.parent / "heldout.jsonl"
    with tempfile.TemporaryDirectory() as d:
        cfg = export.ExportConfig(quants=["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"])
        res = export.run(cfg, merged, val, "bench", 512, Path(d), held if held.exists() else None)
    q = Table(
        title=f"quant ladder, {res.eval_tokens} tokens of held-out + validation chat (gate: "
        f"mean KLD <= {cfg.quality_gate.max_mean_kld}, PPL ratio <= {cfg.quality_gate.max_ppl_ratio})"
    )
    for col in ("quant", "MB", "PPL ratio", "ΔPPL", "mean KLD", "P99 KLD", "same top-1", "top-1 vs HF", "gate"):
        q.add_column(col)
    base_ppl = res.files[0].ppl
    for f in res.files:
        q.add_row(
            f.name + (" *" if f.name == res.selected else ""),
            f"{f.size_bytes / 1e6:.0f}",
            f"{f.ppl_ratio:.3f}" if f.ppl_ratio else "ref",
            f"{f.ppl - base_ppl:+.3f}" if f.ppl_ratio else "",
            f"{f.mean_kld:.4f}" if f.mean_kld is not None else "",
            f"{f.p99_kld:.3f}" if f.p99_kld is not None else "",
            f"{100 * f.same_top:.1f}%" if f.same_top is not None else "",
            f"{100 * f.top1_agreement:.1f}%",
            {True: "pass", False: "fail", None: ""}[f.passed],
        )
    console.print(q)
    dst = ROOT / "bench" / "results" / "export_speed.json"
    write_json(
        dst,
        {
            "ratio": statistics.median(ratios),
            "target": 1.2,
            "times_s": times,
            "ratios_per_round": ratios,
            "quant_table": [f.model_dump() for f in res.files],
            "selected": res.selected,
            "eval_tokens": res.eval_tokens,
        },
    )
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
