"""llama-server with parallel slots (ftx's default, continuous batching) vs a single slot, same GGUF, same load.

Prints a table and writes bench/results/serve_slots.json; headline `ratio` = output tok/s with
`--parallel 4` divided by output tok/s with `--parallel 1`, both at client concurrency 4, measured in one
run (alternating A B A B so machine drift hits both). Uses the quickstart run's Q4_K_M GGUF
(run `make quickstart` first, or pass a GGUF path).

    .venv/bin/python bench/serve_slots.py [path/to/model.gguf] [--rounds 2] [--requests 32]
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
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()
    gguf = Path(args.gguf)
    if not gguf.exists():
        sys.exit(f"{gguf}: not found; run `make quickstart` first or pass a GGUF path")
    prompts = [m[:-1] for m in data.load_rows(ROOT / "recipes" / "data" / "quickstart_heldout.jsonl")]
    cfg = bench.BenchConfig(requests=args.requests, concurrency=4, warmup=2, max_tokens=64)
    results = {"parallel_4": [], "parallel_1": []}
    for _ in range(args.rounds):
        for name, slots in (("parallel_4", 4), ("parallel_1", 1)):
            scfg = serve.ServeConfig(parallel=slots, ctx_size=4096)
            with serve.running(scfg, gguf, "bench", Path(tempfile.mkdtemp()) / "server.log") as ep:
                r = bench.measure(cfg, ep, prompts)
            results[name].append({"tok_s": r.output_tokens_per_s, "p99_e2e_s": r.e2e_s["p99"], "errors": r.errors})
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("tok_s", "p99_e2e_s")} for k, v in results.items()}
    ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(results["parallel_4"], results["parallel_1"])]
    out = {
        "ratio": statistics.median(ratios),
        "ratios_per_round": ratios,
        "median": med,
        "runs": results,
        "config": {"gguf": str(gguf), "requests": args.requests, "concurrency": 4, "max_tokens": 64},
    }
    table = Table(title="llama-server: 4 slots vs 1 slot (client concurrency 4)")
    for col in ("config", "output tok/s (median)", "P99 e2e s (median)"):
        table.add_column(col)
    for k, v in med.items():
        table.add_row(k, f"{v['tok_s']:.1f}", f"{v['p99_e2e_s']:.3f}")
    table.add_row(
        "ratio 4/1", f"{out['ratio']:.2f}x", f"{med['parallel_4']['p99_e2e_s'] / med['parallel_1']['p99_e2e_s']:.2f}x"
    )
    Console().print(table)
    dst = ROOT / "bench" / "results" / "serve_slots.json"
    write_json(dst, out)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
