"""ftx's serving layer (ftx.gateway in front of llama-server) vs the raw engine: same GGUF, same slots, same load.

Targets (issue 6): throughput ratio >= 0.97 (<= 3% overhead), P99 end-to-end latency ratio <= 1.05.
Prints a table and writes bench/results/serve_overhead.json; headline `ratio` = output tok/s through the
gateway / output tok/s straight from llama-server, `p99_ratio` = P99 e2e through the gateway / raw, both
medians of per-round ratios; both servers run for the whole benchmark and are loaded one at a time in
A B B A order, so machine drift hits both. Streaming chat requests with the
openai async client (ftx.bench). Uses the quickstart run's selected GGUF unless a path is given.

    .venv/bin/python bench/serve_overhead.py [path/to/model.gguf] [--rounds 8] [--requests 32]
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from ftx import bench, data, serve
    from ftx.util import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?", default=str(ROOT / "runs" / "quickstart" / "latest" / "model-q4_k_m.gguf"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    gguf = Path(args.gguf)
    if not gguf.exists():
        sys.exit(f"{gguf}: not found; run `make quickstart` first or pass a GGUF path")
    prompts = [m[:-1] for m in data.load_rows(ROOT / "recipes" / "data" / "quickstart_heldout.jsonl")]
    cfg = bench.BenchConfig(requests=args.requests, concurrency=args.concurrency, warmup=4, max_tokens=64)
    scfg = serve.ServeConfig(parallel=4, ctx_size=4096)
    tmp = Path(tempfile.mkdtemp())
    # both up for the whole run, used one at a time in A B B A order, so drift and noise hit both alike
    with serve.running(scfg, gguf, "bench", tmp / "raw.log", raw=True) as raw_ep, \
            serve.running(scfg, gguf, "bench", tmp / "gw.log") as gw_ep:
        runs = bench.ab_rounds(cfg, {"raw llama-server": (raw_ep, None), "ftx gateway": (gw_ep, None)}, prompts,
                               args.rounds)
    out = bench.ab_summary(runs, f"serving layer overhead ({args.requests} streaming requests, concurrency "
                                 f"{args.concurrency})", "gateway / raw")
    out.update(targets={"ratio": ">= 0.97", "p99_ratio": "<= 1.05"},
               config={"gguf": str(gguf), "requests": args.requests, "concurrency": args.concurrency,
                       "max_tokens": 64, "parallel": 4, "rounds": args.rounds})
    dst = ROOT / "bench" / "results" / "serve_overhead.json"
    write_json(dst, out)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
