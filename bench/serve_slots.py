"""llama-server with parallel slots (ftx's default, continuous batching) vs a single slot, same GGUF, same load.

Headline `ratio` = output tok/s with 4 slots / with 1 slot, both at client concurrency 4 (median of per-round
ratios; each round restarts both servers, in alternating order: bench/harness.py); target >= 1 (slots must not
cost throughput). Uses the quickstart run's Q4_K_M GGUF unless a path is given.

    .venv/bin/python bench/serve_slots.py [path/to/model.gguf] [--rounds 5] [--requests 32]
"""

import tempfile
from pathlib import Path

import harness


def main() -> None:
    from ftx import bench, serving
    from ftx.core.rows import load_rows

    ap = harness.parser(__doc__)
    ap.add_argument("gguf", nargs="?", default=None)
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()
    gguf = Path(args.gguf) if args.gguf else harness.quickstart_run() / "model-q4_k_m.gguf"
    prompts = [m[:-1] for m in load_rows(harness.ROOT / "recipes" / "data" / "quickstart_heldout.jsonl")]
    cfg = bench.BenchConfig(requests=args.requests, concurrency=4, warmup=2, max_tokens=64)

    def arm(slots: int):
        def run() -> dict:
            settings = serving.ServeSettings(llamacpp={"parallel": slots, "ctx_size": 4096})
            with serving.start(settings, gguf, "bench", Path(tempfile.mkdtemp()) / "server.log") as ep:
                r = bench.measure(cfg, ep, prompts)
            return {"tok_s": r.output_tokens_per_s, "p99_e2e_s": r.e2e_s["p99"], "errors": r.errors}

        return run

    runs = harness.ab_rounds({"parallel_1": arm(1), "parallel_4": arm(4)}, args.rounds, args.warmup)
    med = harness.medians(runs, ("tok_s", "p99_e2e_s"))
    harness.table(
        "llama-server: 4 slots vs 1 slot (client concurrency 4)",
        ["config", "output tok/s", "P99 e2e s"],
        [[k, f"{v['tok_s']:.1f}", f"{v['p99_e2e_s']:.3f}"] for k, v in med.items()],
    )
    harness.write(
        "serve_slots",
        harness.summarize(harness.per_round(runs, "tok_s", "parallel_4", "parallel_1"), ">= 1"),
        {"gguf": str(gguf), "requests": args.requests, "concurrency": 4, "max_tokens": 64, "rounds": args.rounds},
        median=med,
        runs=runs,
    )


if __name__ == "__main__":
    main()
