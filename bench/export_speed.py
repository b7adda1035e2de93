"""Export speed: merged HF model -> f16 GGUF -> Q4_K_M through ftx, against the same converter and quantizer
invoked by hand (what a user types following llama.cpp's README). Then the full ftx export of the same model
with its quality table (size, PPL ratio, KL divergence, top-1).

Headline `ratio` = median over rounds of ftx wall time / by-hand wall time in the same round (target <= 1.2).
Needs the quickstart run (`make quickstart`) or --merged DIR.

    .venv/bin/python bench/export_speed.py [--rounds 5] [--merged runs/quickstart/latest/merged]
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import harness


def by_hand(merged: Path, out: Path) -> None:
    from ftx.core import llamacpp

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
    from ftx.core import gguf
    from ftx.formats.gguf import quantize

    gguf.convert_hf(merged, out / "model-f16.gguf", "f16", "bench")
    quantize(out / "model-f16.gguf", out / "model-q4_k_m.gguf", "q4_k_m")


def timed(fn, merged: Path):
    def arm() -> dict:
        with tempfile.TemporaryDirectory() as d:
            fn(merged, Path(d))
        return {}  # the harness times the arm (wall_s)

    return arm


def main() -> None:
    from ftx.stages.export import ExportConfig, export

    ap = harness.parser(__doc__)
    ap.add_argument("--merged", type=Path, default=None)
    args = ap.parse_args()
    run = None if args.merged else harness.quickstart_run()
    merged = (args.merged or run / "merged").resolve()
    runs = harness.ab_rounds({"hand": timed(by_hand, merged), "ftx": timed(with_ftx, merged)}, args.rounds, args.warmup)
    med = harness.medians(runs, ("wall_s",))
    harness.table(
        "merged -> f16 GGUF -> Q4_K_M, wall seconds",
        ["path", "median s", "rounds"],
        [[k, f"{med[k]['wall_s']:.1f}", ", ".join(f"{r['wall_s']:.1f}" for r in v)] for k, v in runs.items()],
    )
    headline = harness.summarize(harness.per_round(runs, "wall_s", "ftx", "hand"), "<= 1.2")

    data = (run or merged.parent.parent) / "stages" / "data"
    held = data / "heldout.jsonl"
    with tempfile.TemporaryDirectory() as d:
        cfg = ExportConfig(gguf={"quants": ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]}, modelfile=None)
        res = export(cfg, merged, data / "val.jsonl", "bench", 512, Path(d), held if held.exists() else None)
    base = res.files[0].ppl
    harness.table(
        f"quant ladder, {res.eval_tokens} tokens of held-out + validation chat (gate: mean KLD <= "
        f"{cfg.quality_gate.max_mean_kld}, PPL ratio <= {cfg.quality_gate.max_ppl_ratio})",
        ["quant", "MB", "PPL ratio", "ΔPPL", "mean KLD", "P99 KLD", "same top-1", "top-1 vs HF", "gate"],
        [
            [
                f.name + (" *" if f.name == res.selected else ""),
                f"{f.size_bytes / 1e6:.0f}",
                f"{f.ppl_ratio:.3f}" if f.ppl_ratio else "ref",
                f"{f.ppl - base:+.3f}" if f.ppl_ratio else "",
                f"{f.mean_kld:.4f}" if f.mean_kld is not None else "",
                f"{f.p99_kld:.3f}" if f.p99_kld is not None else "",
                f"{100 * f.same_top:.1f}%" if f.same_top is not None else "",
                f"{100 * f.top1_agreement:.1f}%",
                {True: "pass", False: "fail", None: ""}[f.passed],
            ]
            for f in res.files
        ],
    )
    harness.write(
        "export_speed",
        headline,
        {"merged": str(merged), "rounds": args.rounds, "warmup": args.warmup},
        times_s={k: [r["wall_s"] for r in v] for k, v in runs.items()},
        quant_table=[f.model_dump() for f in res.files],
        selected=res.selected,
        eval_tokens=res.eval_tokens,
    )


if __name__ == "__main__":
    main()
