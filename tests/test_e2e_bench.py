"""`ftx bench` against a real llama-server (the quickstart's Q4_K_M behind ftx's gateway): load profiles,
synthetic prompts of exact length, compare mode, and the faults a bench must survive (server errors, timeouts,
Ctrl-C) or refuse up front (unreachable endpoint, wrong key, unknown model)."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import BENCH_REQUESTS, FTX

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def endpoint(quickstart_run, tmp_path_factory):
    from ftx.serving import ServeSettings, start

    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    settings = ServeSettings(llamacpp={"parallel": 4, "ctx_size": 4096})
    with start(settings, quickstart_run["dir"] / "model-q4_k_m.gguf", "qs", log) as ep:
        yield ep


def bench(ep, out, *args, key=None, timeout=600):
    cmd = [
        *FTX,
        "bench",
        "--base-url",
        ep.base_url,
        "--model",
        "qs",
        "--api-key",
        key or ep.api_key,
        "--out",
        str(out),
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def load(out):
    return (
        json.loads((out / "summary.json").read_text()),
        [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()],
    )


def test_poisson_synthetic_prompts_have_exact_lengths(endpoint, base_dir, tmp_path):
    """Synthetic prompts of exactly 40 tokens, exactly 16 output tokens each (ignore_eos), Poisson arrivals."""
    from transformers import AutoTokenizer

    out = tmp_path / "poisson"
    proc = bench(
        endpoint,
        out,
        "--mode",
        "poisson",
        "--rate",
        50,
        "--requests",
        12,
        "--synthetic",
        40,
        "--tokenizer",
        base_dir,
        "--max-tokens",
        16,
        "--seed",
        3,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, records = load(out)
    assert summary["mode"] == "poisson" and [lv["level"] for lv in summary["targets"][0]["levels"]] == [50]
    assert len(records) == 12 and all(r["ok"] for r in records)
    assert all(r["output_tokens"] == 16 for r in records)  # ignore_eos is on for synthetic prompts
    tok = AutoTokenizer.from_pretrained(base_dir)
    overhead = (
        len(tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, return_dict=False))
        - 1
    )
    assert {r["input_tokens"] for r in records} == {40 + overhead}  # server-counted, chat template included
    # open loop: arrivals do not wait for answers, so more requests are in flight than the server has slots (4)
    events = sorted([(r["start_s"], 1) for r in records] + [(r["start_s"] + r["e2e_s"], -1) for r in records])
    assert max(np.cumsum([e for _, e in events])) > 4
    assert "| rate (req/s) |" in (out / "summary.md").read_text()


def test_prompts_are_fresh_per_run_and_a_warm_cache_rerun_is_reported(endpoint, base_dir, tmp_path):
    """llama-server keeps prompts in its cache: a run with the same synthetic prompts as an earlier one is served
    from it (its cached share is reported and warned about); by default every run draws fresh prompts."""
    from ftx import bench
    from ftx.bench.prompts import load_tokenizer

    tok = load_tokenizer(str(base_dir))
    target = [bench.Target("qs", endpoint.base_url, endpoint.api_key, ["qs"])]

    def run(name, **prompts):
        cfg = bench.BenchConfig(
            concurrency=2,
            requests=4,
            warmup=0,
            max_tokens=4,
            prompts={"source": "synthetic", "input_tokens": 100, "count": 4, **prompts},
        )
        return bench.run(cfg, target, bench.load_prompts(cfg, tokenizer=tok), tmp_path / name, tok)

    first = run("first")
    seed = first.prompts["seed"]
    assert seed is not None and first.warnings == []
    level = first.targets[0]["levels"][0]["summary"]
    assert level["cached_share"] < 0.5  # at most the chat template's system prompt
    again = run("again", seed=seed)  # the same prompts again, on purpose: a warm-cache measurement
    share = again.targets[0]["levels"][0]["summary"]["cached_share"]
    assert share > 0.9 and len(again.warnings) == 1 and "prompt cache" in again.warnings[0]
    assert "**Warning:**" in (tmp_path / "again" / "summary.md").read_text()
    fresh = run("fresh")
    assert fresh.prompts["seed"] != seed and fresh.targets[0]["levels"][0]["summary"]["cached_share"] < 0.5


def test_sweep_burst_and_token_fallback_matches_server_usage(endpoint, base_dir, tmp_path, quickstart_run):
    """A burst sweep: each level sends everything at once. The tokenizer fallback counts what the server counts."""
    from ftx.bench import prompts as P
    from ftx.core.chat import read_split

    prompts = tmp_path / "p.jsonl"
    held = read_split(quickstart_run["dir"] / "stages" / "data" / "heldout.jsonl")
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in held))
    out = tmp_path / "burst"
    proc = bench(endpoint, out, "--mode", "burst", "--sweep", "2,6", "--prompts", prompts, "--warmup", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, records = load(out)
    assert [lv["level"] for lv in summary["targets"][0]["levels"]] == [2, 6]
    assert sorted((r["level"], r["i"]) for r in records) == [(2, 0), (2, 1)] + [(6, i) for i in range(6)]
    for level in (2, 6):  # a burst: every request of the level leaves before any answer comes back
        recs = [r for r in records if r["level"] == level]
        assert max(r["start_s"] for r in recs) < min(r["start_s"] + r["ttft_s"] for r in recs)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    tok = P.load_tokenizer(base_dir)
    level6 = [r for r in records if r["level"] == 6]  # level 6 goes on where level 2 stopped in the prompt list
    assert [r["prompt"] for r in sorted(level6, key=lambda r: r["i"])] == [(2 + i) % len(held) for i in range(6)]
    for r in level6:
        assert P.count_prompt_tokens(tok, held[r["prompt"]][:-1], "chat") == r["input_tokens"]


def test_two_targets_side_by_side_and_compare_command(endpoint, tmp_path):
    """Two names for the same endpoint: ratio columns near 1 in one run, and `ftx bench compare` of two runs."""
    out = tmp_path / "two"
    url = endpoint.base_url
    proc = subprocess.run(
        list(
            map(
                str,
                [
                    *FTX,
                    "bench",
                    "--target",
                    f"a={url}@qs",
                    "--target",
                    f"b={url}@qs",
                    "--synthetic",
                    24,
                    "--max-tokens",
                    8,
                    "--requests",
                    6,
                    "--concurrency",
                    2,
                    "--api-key",
                    endpoint.api_key,
                    "--out",
                    out,
                ],
            )
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, records = load(out)
    assert [t["name"] for t in summary["targets"]] == ["a", "b"] and len(records) == 12
    row = summary["compare"][0]["targets"]["b"]
    assert row["ratio_to_first"]["output tok/s"] == pytest.approx(
        row["values"]["output tok/s"] / summary["compare"][0]["targets"]["a"]["values"]["output tok/s"]
    )
    assert "b / a" in (out / "compare.md").read_text()
    out2 = tmp_path / "one"
    assert (
        bench(endpoint, out2, "--synthetic", 24, "--max-tokens", 8, "--requests", 6, "--concurrency", 2).returncode == 0
    )
    proc = subprocess.run(
        [*FTX, "bench", "compare", str(out), str(out2), "--names", "first,second", "--lora-break-even"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "second / first" in proc.stdout and "machines multi-LoRA" in proc.stdout


def test_server_errors_and_timeouts_are_counted_not_fatal(endpoint, base_dir, tmp_path):
    # prompts longer than a slot's context (4096 / 4 slots): the server answers 400, every one is recorded
    out = tmp_path / "too-long"
    proc = bench(endpoint, out, "--synthetic", 1500, "--tokenizer", base_dir, "--requests", 4, "--warmup", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, records = load(out)
    assert summary["errors"] == 4 and all(not r["ok"] and "400" in r["error"] for r in records)
    assert summary["targets"][0]["levels"][0]["summary"]["meets_slo"] is False and summary["best"] is None
    out = tmp_path / "timeouts"
    proc = bench(
        endpoint, out, "--synthetic", 32, "--max-tokens", 200, "--requests", 3, "--warmup", 0, "--timeout", 0.05
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, records = load(out)
    lv = summary["targets"][0]["levels"][0]["summary"]
    assert lv["errors"] == 3 and lv["timeouts"] == 3 and all("Timeout" in r["error"] for r in records)


def test_bad_endpoints_fail_before_any_load(endpoint, tmp_path):
    from ftx.core.procs import free_port

    cases = [
        (dict(), f"http://127.0.0.1:{free_port('127.0.0.1')}/v1", "is not reachable"),
        (dict(key="wrong"), None, "rejected the API key"),
        (dict(model="nope"), None, "does not serve 'nope'"),
    ]
    for kw, url, msg in cases:
        out = tmp_path / "x"
        cmd = [
            *FTX,
            "bench",
            "--base-url",
            url or endpoint.base_url,
            "--model",
            kw.get("model", "qs"),
            "--api-key",
            kw.get("key", endpoint.api_key),
            "--synthetic",
            8,
            "--out",
            str(out),
        ]
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and msg in lines[0], proc.stderr
        assert not out.exists()


def test_ctrl_c_writes_the_partial_results(endpoint, tmp_path):
    out = tmp_path / "interrupted"
    cmd = [
        *FTX,
        "bench",
        "--base-url",
        endpoint.base_url,
        "--model",
        "qs",
        "--api-key",
        endpoint.api_key,
        "--synthetic",
        16,
        "--max-tokens",
        48,
        "--requests",
        400,
        "--concurrency",
        2,
        "--warmup",
        0,
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a traceback of every thread if it has to be aborted
    # Ctrl-C as on a terminal: a suite started in the background (`make test &`) ignores SIGINT and its children
    # inherit that, so Python would install no handler and the bench would never see the signal
    proc = subprocess.Popen(
        list(map(str, cmd)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # wait until a few requests have finished (each decodes 48 tokens), then Ctrl-C
    start, deadline = _decoded(endpoint), time.time() + 120
    while time.time() < deadline and _decoded(endpoint) - start < 4 * 48:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say where it was stuck (its faulthandler dump on SIGABRT), then fail
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"ftx bench did not stop within 120 s of Ctrl-C:\n{err[-6000:]}")
    assert proc.returncode == 130, err[-2000:]
    summary, records = load(out)
    assert summary["interrupted"] is True and 0 < len(records) < 400
    lv = summary["targets"][0]["levels"][0]
    assert lv["partial"] and lv["summary"]["requests"] == len(records)
    assert all(r["ok"] for r in records)  # what finished; what was cut off is not counted as an error
    assert "Interrupted" in (out / "summary.md").read_text()


def _decoded(ep) -> float:
    """Tokens the llama-server behind the gateway has decoded so far (its Prometheus counter)."""
    import urllib.request

    req = urllib.request.Request(
        ep.base_url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {ep.api_key}"}
    )
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    return float(re.search(r"^llamacpp:n_decode_total\S*\s+(\S+)", text, re.M).group(1))


def test_bench_sweep_goodput_and_cost_from_real_requests(quickstart_run):
    """The recipe's bench: a concurrency sweep whose every figure is recomputed here from records.jsonl."""
    import yaml

    bench_dir = quickstart_run["dir"] / "stages" / "bench"
    records = [json.loads(line) for line in (bench_dir / "records.jsonl").read_text().splitlines()]
    summary = json.loads((bench_dir / "summary.json").read_text())
    cfg = quickstart_run["manifest"]["config"]["bench"]
    levels = cfg["sweep"]
    assert [lv["level"] for lv in summary["targets"][0]["levels"]] == levels == [1, 2, 4, 8]
    assert len(records) == BENCH_REQUESTS * len(levels)
    slo = cfg["slo"]
    for lv in summary["targets"][0]["levels"]:
        recs = [r for r in records if r["level"] == lv["level"]]
        s = lv["summary"]
        assert sorted(r["i"] for r in recs) == list(range(BENCH_REQUESTS))
        assert all(
            r["ok"]
            and r["token_source"] == "usage"
            and r["output_tokens"] > 0
            and r["input_tokens"] > 0
            and 0 < r["ttft_s"] <= r["e2e_s"]
            for r in recs
        )
        # the server never has more than `level` requests of this client: starts and ends interleave that way
        events = sorted([(r["start_s"], 1) for r in recs] + [(r["start_s"] + r["e2e_s"], -1) for r in recs])
        assert max(np.cumsum([e for _, e in events])) <= lv["level"]
        for key in ("ttft_s", "e2e_s"):
            vals = [r[key] for r in recs]
            for p in (50, 90, 95, 99):
                assert s[key][f"p{p}"] == pytest.approx(np.percentile(vals, p))
        gaps = [g for r in recs for g in r["itl_s"]]
        assert s["itl_s"]["n"] == len(gaps) and s["itl_s"]["p99"] == pytest.approx(np.percentile(gaps, 99))
        good = [
            r
            for r in recs
            if r["ttft_s"] <= slo["ttft_ms"] / 1000 and (r["tpot_s"] is None or r["tpot_s"] <= slo["tpot_ms"] / 1000)
        ]
        assert s["goodput"]["requests"] == len(good)
        assert s["goodput"]["output_tokens_per_s"] == pytest.approx(sum(r["output_tokens"] for r in good) / s["wall_s"])
        meets = (
            np.percentile([r["ttft_s"] for r in recs], 99) <= slo["ttft_ms"] / 1000
            and np.percentile([r["tpot_s"] for r in recs if r["tpot_s"]], 99) <= slo["tpot_ms"] / 1000
        )
        assert s["meets_slo"] == meets
        # llama-server's own timings of the same requests (prefill, decode per token): what the server measured
        # lies inside what the client measured, and the decode pace both saw is the same
        own = lv["server"]
        assert own["source"] == "llama-server timings" and own["requests"] == len(recs)
        assert all(r["ttft_s"] >= r["server"]["ttft_s"] and r["e2e_s"] >= r["server"]["e2e_s"] for r in recs)
        assert own["ttft_s"] == pytest.approx(np.mean([r["server"]["ttft_s"] for r in recs]))
        assert 0.9 < lv["agreement"]["tpot_s"] < 1.1 and lv["agreement"]["e2e_s"] >= 1.0, lv["agreement"]
    passing = [lv["level"] for lv in summary["targets"][0]["levels"] if lv["summary"]["meets_slo"]]
    assert (summary["best"] or {}).get("level") == (max(passing) if passing else None)
    if summary["best"]:  # $ per 1M tokens from the goodput and the hardware profile (an always-on cloud VM)
        hw = yaml.safe_load(Path(cfg["hardware"]).read_text())
        g = summary["best"]["summary"]["goodput"]
        tokens = (g["input_tokens_per_s"] + g["output_tokens_per_s"]) * 3600 * 730 * hw["utilization"]
        assert summary["cost"]["usd_per_1m_tokens"] == pytest.approx(hw["usd_per_hour"] * 730 / tokens * 1e6)
        assert {a["api"] for a in summary["apis"]} >= {"gpt-4o-mini", "claude-haiku-4.5", "gemini-2.5-flash"}
    md = (quickstart_run["dir"] / "run_card.md").read_text()
    assert "| concurrency | req/s |" in md and "SLO: P99 of TTFT ≤ 1000 ms, TPOT ≤ 100 ms" in md
    assert "Server's own timings (llama-server timings), ftx / server:" in md
    assert ("per 1M tokens" in md and "gpt-4o-mini" in md) if summary["best"] else "No load level met the SLO" in md
    for png in ("latency_cdf.png", "sweep.png"):
        assert (quickstart_run["dir"] / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_plan_gives_replicas_and_cost_from_the_measured_goodput(quickstart_run, tmp_path):
    """`ftx bench plan` on the recipe's real bench: replicas = ceil(R x 1.2 / goodput of the highest level meeting the
    SLO), priced with the hardware profile the bench ran with; an SLO no level meets is an error, not a guess."""
    import math

    import yaml

    bench_dir = quickstart_run["dir"] / "stages" / "bench"
    summary = json.loads((bench_dir / "summary.json").read_text())
    cfg = quickstart_run["manifest"]["config"]["bench"]
    proc = subprocess.run(
        [*FTX, "bench", "plan", "--results", str(bench_dir), "--rps", "20", "--out", str(tmp_path / "plan.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((tmp_path / "plan.json").read_text())
    best = summary["best"]  # the bench's own verdict under the same SLO
    assert best is not None and row["level"] == best["level"]
    per = best["summary"]["goodput"]["requests_per_s"]
    assert row["replica_goodput_rps"] == pytest.approx(per)
    assert row["replicas"] == math.ceil(20 * 1.2 / per) and row["load"] == pytest.approx(20 / (row["replicas"] * per))
    hw = yaml.safe_load(Path(cfg["hardware"]).read_text())
    assert row["hardware"] == hw["name"] and row["usd_per_month"] == pytest.approx(
        row["replicas"] * hw["usd_per_hour"] * 730
    )
    assert f"| {hw['name']} |" in proc.stdout and "| replicas |" in proc.stdout
    strict = subprocess.run(
        [*FTX, "bench", "plan", "--results", str(bench_dir), "--rps", "20", "--ttft-ms", "0.001"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert strict.returncode == 2 and "no bench result meets the SLO" in strict.stderr, strict.stderr
    assert "no measured load level meets the SLO" in strict.stdout
