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
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from rich.console import Console
    from rich.table import Table

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
    results = {"raw llama-server": [], "ftx gateway": []}
    scfg = serve.ServeConfig(parallel=4, ctx_size=4096)
    tmp = Path(tempfile.mkdtemp())
    # both up for the whole run, used one at a time in A B B A order, so drift and noise hit both alike
    with serve.running(scfg, gguf, "bench", tmp / "raw.log", raw=True) as raw_ep, \
            serve.running(scfg, gguf, "bench", tmp / "gw.log") as gw_ep:
        eps = {"raw llama-server": raw_ep, "ftx gateway": gw_ep}
        for i in range(args.rounds):
            for name in (list(eps) if i % 2 == 0 else list(eps)[::-1]):
                ep = eps[name]
                r = bench.run(cfg, ep.base_url, ep.api_key, ep.model, prompts, Path(tempfile.mkdtemp()))
                results[name].append({"tok_s": r.output_tokens_per_s, "p99_e2e_s": r.e2e_s["p99"],
                                      "p99_ttft_s": r.ttft_s["p99"], "errors": r.errors})
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("tok_s", "p99_e2e_s", "p99_ttft_s")}
           for k, v in results.items()}
    raw, gw = results["raw llama-server"], results["ftx gateway"]
    tput = [b["tok_s"] / a["tok_s"] for a, b in zip(raw, gw)]
    p99 = [b["p99_e2e_s"] / a["p99_e2e_s"] for a, b in zip(raw, gw)]
    out = {"ratio": statistics.median(tput), "p99_ratio": statistics.median(p99), "ratios_per_round": tput,
           "p99_ratios_per_round": p99, "targets": {"ratio": ">= 0.97", "p99_ratio": "<= 1.05"},
           "median": med, "runs": results,
           "config": {"gguf": str(gguf), "requests": args.requests, "concurrency": args.concurrency,
                      "max_tokens": 64, "parallel": 4, "rounds": args.rounds}}
    table = Table(title=f"serving layer overhead ({args.requests} streaming requests, concurrency {args.concurrency})")
    for col in ("config", "output tok/s", "P99 e2e s", "P99 TTFT s", "errors"):
        table.add_column(col)
    for k, v in med.items():
        table.add_row(k, f"{v['tok_s']:.1f}", f"{v['p99_e2e_s']:.3f}", f"{v['p99_ttft_s']:.3f}",
                      str(sum(x["errors"] for x in results[k])))
    table.add_row("gateway / raw", f"{out['ratio']:.3f}x", f"{out['p99_ratio']:.3f}x", "", "")
    Console().print(table)
    dst = ROOT / "bench" / "results" / "serve_overhead.json"
    write_json(dst, out)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
