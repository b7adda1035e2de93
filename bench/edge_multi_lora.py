"""llama.cpp multi-LoRA on the edge: one llama-server with the base GGUF and 4 GGUF LoRA adapters (requests round
robin over the 4 adapter names, through ftx's gateway, which picks each request's adapter) vs the merged GGUF
(the adapter merged into the base, no LoRA), same traffic (128-token synthetic prompts, fresh for every run, 64
output tokens), same slots, same precision (f16 both: the quickstart's base-f16.gguf + adapter-f16.gguf vs
model-f16.gguf).

llama-server batches only requests with the same adapter set into one decode step (server-context.cpp,
`can_batch_with`: `are_lora_equal`), so round-robin traffic over 4 adapters at concurrency 4 decodes one request
per step where the merged model decodes four. Target: throughput ratio multi-LoRA / merged >= 0.7. Headline
`ratio` = output tok/s multi-LoRA / merged, `p99_ratio` = P99 e2e, medians of per-round ratios (bench/harness.py);
both servers stay up and are loaded one at a time in alternating order. Also measured: the same LoRA server with
all requests on one adapter (what batching across adapters would give), to separate the cost of the adapter
computation from the cost of not batching.

    .venv/bin/python bench/edge_multi_lora.py [--run runs/quickstart/latest] [--rounds 5]
"""

import tempfile
from pathlib import Path

import harness


def main() -> None:
    from ftx import bench, serving
    from ftx.bench.prompts import load_tokenizer, synthetic

    ap = harness.parser(__doc__)
    ap.add_argument("--run", type=Path, default=None, help="a quickstart run dir")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    run = args.run or harness.quickstart_run()
    adapters = {f"lora{i}": (run / "adapter-f16.gguf").resolve() for i in range(4)}
    tok = load_tokenizer("smollm2-135m-instruct")
    seeds = iter(range(10**6))
    cfg = bench.BenchConfig(requests=args.requests, concurrency=args.concurrency, warmup=4, max_tokens=64)
    settings = serving.ServeSettings(engine="llamacpp", llamacpp={"parallel": args.concurrency, "ctx_size": 4096})
    tmp = Path(tempfile.mkdtemp())

    def fresh() -> list[str]:  # fresh prompts every run: nothing is served from a prompt cache an earlier run filled
        return synthetic(128, cfg.requests + cfg.warmup, next(seeds), tok)

    with (
        serving.start(settings, (run / "model-f16.gguf").resolve(), "merged", tmp / "merged.log", adapters={}) as m,
        serving.start(settings, (run / "base-f16.gguf").resolve(), "base", tmp / "lora.log", adapters=adapters) as lo,
    ):
        runs = harness.ab_rounds(
            {
                "merged f16": harness.endpoint_arm(cfg, m, fresh),
                "LoRA x4 round robin": harness.endpoint_arm(cfg, lo, fresh, list(adapters)),
                "LoRA, one adapter": harness.endpoint_arm(cfg, lo, fresh, ["lora0"]),
            },
            args.rounds,
            args.warmup,
        )
    med = harness.medians(runs, ("tok_s", "p99_e2e_s"))
    harness.table(
        f"llama-server, 4 slots: 4 GGUF LoRA adapters (round robin) vs merged GGUF, concurrency {args.concurrency}",
        ["config", "output tok/s", "P99 e2e s", "vs merged", "errors"],
        [
            [
                k,
                f"{v['tok_s']:.1f}",
                f"{v['p99_e2e_s']:.3f}",
                f"{v['tok_s'] / med['merged f16']['tok_s']:.2f}",
                str(sum(r["errors"] for r in runs[k])),
            ]
            for k, v in med.items()
        ],
    )
    headline = harness.summarize(harness.per_round(runs, "tok_s", "LoRA x4 round robin", "merged f16"), ">= 0.7")
    p99 = harness.summarize(harness.per_round(runs, "p99_e2e_s", "LoRA x4 round robin", "merged f16"), None)
    one = harness.summarize(harness.per_round(runs, "tok_s", "LoRA, one adapter", "merged f16"), None)
    harness.write(
        "edge_multi_lora",
        headline,
        {
            "adapters": {k: str(v) for k, v in adapters.items()},
            "requests": args.requests,
            "concurrency": args.concurrency,
            "slots": args.concurrency,
            "max_tokens": 64,
            "prompts": "synthetic, 128 tokens, a fresh seed per run",
            "rounds": args.rounds,
            "engine": "llama-server (llama-cpp-python 0.3.36 sdist), f16, behind ftx's gateway",
        },
        p99_ratio=p99["ratio"],
        p99=p99,
        one_adapter_ratio=one["ratio"],
        one_adapter=one,
        median=med,
        runs=runs,
    )


if __name__ == "__main__":
    main()
