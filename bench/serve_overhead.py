"""ftx's serving layer (ftx.gateway in front of llama-server) vs the raw engine: same GGUF, same slots, same load.

Targets: throughput ratio >= 0.97 (<= 3% overhead), P99 end-to-end latency ratio <= 1.05. Both servers run for the
whole benchmark and are loaded one at a time in alternating order (bench/harness.py). Headline `ratio` = output
tok/s through the gateway / straight from llama-server (median of per-round ratios), `p99_ratio` the same for P99
e2e. Also `gateway_cpu_share`: the gateway's CPU time over that of the llama-server behind it, steadier than
throughput on a shared machine. Streaming chat requests with the openai async client (ftx.bench). Uses the
quickstart run's Q4_K_M GGUF unless a path is given. On a 2-core CPU the engine saturates both cores by default,
so anything else that runs (the bench client, the gateway) takes CPU from it; `--threads 1` leaves a core to
them, as a GPU engine would.

    .venv/bin/python bench/serve_overhead.py [path/to/model.gguf] [--rounds 8] [--requests 32] [--threads N]
"""

import tempfile
from pathlib import Path

import harness
import psutil


def main() -> None:
    from ftx import bench, serving
    from ftx.core.rows import load_rows

    ap = harness.parser(__doc__, rounds=8)
    ap.add_argument("gguf", nargs="?", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="llama-server threads (default: all cores)")
    args = ap.parse_args()
    gguf = Path(args.gguf) if args.gguf else harness.quickstart_run() / "model-q4_k_m.gguf"
    prompts = [m[:-1] for m in load_rows(harness.ROOT / "recipes" / "data" / "quickstart_heldout.jsonl")]
    cfg = bench.BenchConfig(requests=args.requests, concurrency=args.concurrency, warmup=4, max_tokens=64)
    settings = serving.ServeSettings(llamacpp={"parallel": 4, "ctx_size": 4096, "threads": args.threads})
    tmp = Path(tempfile.mkdtemp())

    with (
        serving.start(settings, gguf, "bench", tmp / "raw.log", raw=True) as raw,
        serving.start(settings, gguf, "bench", tmp / "gw.log") as gw,
    ):
        procs = {"gateway": psutil.Process(gw.process.pid), "engine": psutil.Process(gw.engine.pid)}
        cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
        runs = harness.ab_rounds(
            {
                "raw llama-server": harness.endpoint_arm(cfg, raw, prompts),
                "ftx gateway": harness.endpoint_arm(cfg, gw, prompts),
            },
            args.rounds,
            args.warmup,
        )
        cpu = {k: sum(p.cpu_times()[:2]) - cpu0[k] for k, p in procs.items()}
    med = harness.medians(runs, ("tok_s", "p99_e2e_s"))
    p99 = harness.summarize(harness.per_round(runs, "p99_e2e_s", "ftx gateway", "raw llama-server"), "<= 1.05")
    harness.table(
        f"serving layer overhead ({args.requests} streaming requests, concurrency {args.concurrency})",
        ["config", "output tok/s", "P99 e2e s", "errors"],
        [
            [k, f"{v['tok_s']:.1f}", f"{v['p99_e2e_s']:.3f}", str(sum(r["errors"] for r in runs[k]))]
            for k, v in med.items()
        ],
    )
    share = cpu["gateway"] / cpu["engine"]
    print(
        f"gateway CPU {cpu['gateway']:.2f} s = {100 * share:.1f}% of the CPU time of the llama-server behind it "
        f"({cpu['engine']:.1f} s); P99 ratio {p99['ratio']:.3f} (target <= 1.05, met: {p99['met']})"
    )
    name = "serve_overhead" if args.threads is None else f"serve_overhead_t{args.threads}"
    harness.write(
        name,
        harness.summarize(harness.per_round(runs, "tok_s", "ftx gateway", "raw llama-server"), ">= 0.97"),
        {
            "gguf": str(gguf),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": 64,
            "parallel": 4,
            "rounds": args.rounds,
            "threads": args.threads,
        },
        p99_ratio=p99["ratio"],
        p99=p99,
        gateway_cpu_share=share,
        cpu_s=cpu,
        median=med,
        runs=runs,
    )


if __name__ == "__main__":
    main()
