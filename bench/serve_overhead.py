"""ftx's serving layer (ftx.gateway in front of llama-server) vs the raw engine: same GGUF, same slots, same load.

Targets (issue 6): throughput ratio >= 0.97 (<= 3% overhead), P99 end-to-end latency ratio <= 1.05.
Prints a table and writes bench/results/serve_overhead.json (serve_overhead_t<N>.json with --threads N);
headline `ratio` = output tok/s through the gateway / output tok/s straight from llama-server, `p99_ratio` =
P99 e2e through the gateway / raw, both medians of per-round ratios; both servers run for the whole benchmark
and are loaded one at a time in A B B A order, so machine drift hits both. Also `gateway_cpu_share`: the
gateway's CPU time over that of the llama-server behind it, steadier than throughput on a shared machine.
Streaming chat requests with the openai async client (ftx.bench). Uses the quickstart run's Q4_K_M GGUF
unless a path is given. On a 2-core CPU the engine saturates both cores by default, so anything else that runs
(the bench client, the gateway) takes CPU from it; `--threads 1` leaves a core to them, as a GPU engine would.

    .venv/bin/python bench/serve_overhead.py [path/to/model.gguf] [--rounds 8] [--requests 32] [--threads N]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from ftx import bench, data, serve
    from ftx.util import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?", default=str(ROOT / "runs" / "quickstart" / "latest" / "model-q4_k_m.gguf"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="llama-server threads (default: all cores)")
    args = ap.parse_args()
    gguf = Path(args.gguf)
    if not gguf.exists():
        sys.exit(f"{gguf}: not found; run `make quickstart` first or pass a GGUF path")
    prompts = [m[:-1] for m in data.load_rows(ROOT / "recipes" / "data" / "quickstart_heldout.jsonl")]
    cfg = bench.BenchConfig(requests=args.requests, concurrency=args.concurrency, warmup=4, max_tokens=64)
    scfg = serve.ServeConfig(parallel=4, ctx_size=4096, threads=args.threads)
    tmp = Path(tempfile.mkdtemp())
    # both up for the whole run, used one at a time in A B B A order, so drift and noise hit both alike
    with (
        serve.running(scfg, gguf, "bench", tmp / "raw.log", raw=True) as raw_ep,
        serve.running(scfg, gguf, "bench", tmp / "gw.log") as gw_ep,
    ):
        # CPU time is steadier than the throughput on a shared machine: the gateway's own CPU time against the
        # CPU time of the llama-server behind it, over the whole run (both idle outside the gateway's rounds)
        procs = {"gateway": psutil.Process(gw_ep.process.pid), "engine": psutil.Process(gw_ep.engine.pid)}
        cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
        runs = bench.ab_rounds(
            cfg, {"raw llama-server": (raw_ep, None), "ftx gateway": (gw_ep, None)}, prompts, args.rounds
        )
        cpu = {k: sum(p.cpu_times()[:2]) - cpu0[k] for k, p in procs.items()}
    out = bench.ab_summary(
        runs,
        f"serving layer overhead ({args.requests} streaming requests, concurrency {args.concurrency})",
        "gateway / raw",
    )
    out["gateway_cpu_s"], out["engine_cpu_s"] = cpu["gateway"], cpu["engine"]
    out["gateway_cpu_share"] = cpu["gateway"] / cpu["engine"]
    print(
        f"gateway CPU {cpu['gateway']:.2f} s = {100 * out['gateway_cpu_share']:.1f}% of the CPU time of the "
        f"llama-server behind it ({cpu['engine']:.1f} s)"
    )
    out.update(
        targets={"ratio": ">= 0.97", "p99_ratio": "<= 1.05"},
        config={
            "gguf": str(gguf),
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": 64,
            "parallel": 4,
            "rounds": args.rounds,
            "threads": args.threads,
        },
    )
    name = "serve_overhead" if args.threads is None else f"serve_overhead_t{args.threads}"
    dst = ROOT / "bench" / "results" / f"{name}.json"
    write_json(dst, out)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
