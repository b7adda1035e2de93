"""Pure logic of the bench harness: statistics, goodput at an SLO, cost formulas, break-even, load schedule."""

import datetime as dt

import numpy as np
import pytest

from ftx.bench import BenchConfig, cost, stats


def rec(ttft, e2e, out=11, inp=20, ok=True, itl=None):
    return {
        "ok": ok,
        "ttft_s": ttft if ok else None,
        "e2e_s": e2e,
        "output_tokens": out if ok else None,
        "input_tokens": inp if ok else None,
        "tpot_s": (e2e - ttft) / (out - 1) if ok and out > 1 else None,
        "itl_s": itl or [],
        "token_source": "usage",
        "error": None if ok else "APIStatusError 500: x",
    }


def test_distribution_matches_numpy():
    vals = list(np.random.default_rng(0).gamma(2.0, 0.1, size=101))
    d = stats.distribution(vals)
    assert d["n"] == 101 and d["mean"] == pytest.approx(np.mean(vals)) and d["std"] == pytest.approx(np.std(vals))
    for p in (50, 90, 95, 99):
        assert d[f"p{p}"] == pytest.approx(np.percentile(vals, p))
    assert stats.distribution([])["p99"] is None


def test_goodput_counts_requests_within_every_limit():
    slo = stats.SLO(ttft_ms=100, tpot_ms=20, percentile=50)
    records = [
        rec(0.05, 0.15),  # ttft 50 ms, tpot 10 ms: good
        rec(0.20, 0.30),  # ttft 200 ms: bad
        rec(0.05, 0.55),  # tpot 50 ms: bad
        rec(0.05, 0.10, out=1),  # one token: no tpot, ttft ok: good
        rec(0, 1.0, ok=False),
    ]  # error
    s = stats.summarize(records, wall_s=2.0, slo=slo)
    assert s["requests"] == 5 and s["ok"] == 4 and s["errors"] == 1 and s["error_rate"] == 0.2
    assert s["goodput"]["requests"] == 2 and s["goodput"]["requests_per_s"] == 1.0
    assert s["goodput"]["output_tokens_per_s"] == (11 + 1) / 2
    assert s["goodput"]["input_tokens_per_s"] == 40 / 2
    assert s["goodput"]["prefill_time_share"] == pytest.approx((0.05 + 0.05) / (0.15 + 0.10))
    assert s["request_throughput"] == 2.0 and s["output_tokens_per_s"] == (11 * 3 + 1) / 2
    assert not s["meets_slo"]  # error rate 20% > 0
    assert (
        s["timeouts"] == 0 and stats.summarize([{**rec(0, 1.0, ok=False), "timeout": True}], 1.0, slo)["timeouts"] == 1
    )
    ok_only = stats.summarize(records[:4], 2.0, slo)
    # P50 of TTFT (50, 200, 50, 50 ms) = 50 ms; P50 of TPOT (10, 10, 50 ms) = 10 ms: the level meets the SLO
    assert ok_only["slo_checks"]["ttft_s"]["value"] == pytest.approx(0.05) and ok_only["meets_slo"]
    strict = stats.summarize(records[:4], 2.0, stats.SLO(ttft_ms=100, tpot_ms=20, percentile=99))
    assert not strict["meets_slo"] and not strict["slo_checks"]["ttft_s"]["ok"]


def test_itl_is_pooled_over_requests():
    s = stats.summarize([rec(0.1, 0.3, itl=[0.01, 0.02]), rec(0.1, 0.3, itl=[0.03])], 1.0, stats.SLO())
    assert s["itl_s"]["n"] == 3 and s["itl_s"]["mean"] == pytest.approx(0.02)


def test_best_level_is_the_highest_meeting_the_slo():
    levels = [{"level": lv, "summary": {"meets_slo": ok}} for lv, ok in ((1, True), (2, True), (4, False), (8, True))]
    assert stats.best_level(levels)["level"] == 8
    assert stats.best_level([{"level": 1, "summary": {"meets_slo": False}}]) is None


def hw(**kw):
    base = dict(
        name="box",
        kind="owned",
        purchase_usd=3600,
        amortization_months=36,
        power_w=500,
        idle_power_w=100,
        usd_per_kwh=0.2,
        utilization=0.5,
        source="test",
        as_of=dt.date(2026, 1, 1),
    )
    return cost.Hardware(**{**base, **kw})


def test_owned_hardware_cost_formulas():
    h = hw()
    H = cost.HOURS_PER_MONTH
    assert h.fixed_per_month() == pytest.approx(100 + 0.1 * H * 0.2)
    assert h.energy_per_busy_hour() == pytest.approx(0.4 * 0.2)
    g = {"input_tokens_per_s": 300.0, "output_tokens_per_s": 100.0, "prefill_time_share": 0.25}
    own = cost.self_hosting(h, g)
    busy = 0.5 * H
    monthly = h.fixed_per_month() + 0.08 * busy
    assert own["monthly_cost_usd"] == pytest.approx(monthly)
    assert own["tokens_per_month"] == pytest.approx(400 * 3600 * busy)
    assert own["usd_per_1m_tokens"] == pytest.approx(monthly / (400 * 3600 * busy) * 1e6)
    assert own["usd_per_1m_input"] == pytest.approx(0.25 * monthly / (300 * 3600 * busy) * 1e6)
    assert own["usd_per_1m_output"] == pytest.approx(0.75 * monthly / (100 * 3600 * busy) * 1e6)
    # the input and output parts add back up to the whole month
    assert (
        own["usd_per_1m_input"] * own["input_tokens_per_month"]
        + own["usd_per_1m_output"] * own["output_tokens_per_month"]
    ) / 1e6 == pytest.approx(monthly)


def test_break_even_volume_solves_cost_equality():
    h = hw()
    g = {"input_tokens_per_s": 300.0, "output_tokens_per_s": 100.0, "prefill_time_share": 0.25}
    own = cost.self_hosting(h, g)
    prices = cost.ApiPrices(
        models=[
            cost.ApiPrice(
                name="api",
                provider="p",
                input_usd_per_1m=1.0,
                output_usd_per_1m=4.0,
                source="s",
                as_of=dt.date(2026, 1, 1),
            )
        ]
    )
    (row,) = cost.versus_apis(own, prices, 400.0)
    a = (0.75 * 1.0 + 0.25 * 4.0) / 1e6
    assert row["blended_usd_per_1m"] == pytest.approx(a * 1e6)
    v = row["break_even_tokens_per_month"]
    self_cost = h.fixed_per_month() + h.energy_per_busy_hour() * v / (400 * 3600)
    assert self_cost == pytest.approx(a * v)  # at V*, self-hosting and the API cost the same
    assert row["break_even_reachable"] == (v <= 400 * 3600 * cost.HOURS_PER_MONTH)
    api_month = (own["input_tokens_per_month"] * 1.0 + own["output_tokens_per_month"] * 4.0) / 1e6
    assert row["api_over_self_hosted"] == pytest.approx(api_month / own["monthly_cost_usd"])


def test_cloud_profile_and_incomplete_profiles():
    c = hw(kind="cloud", usd_per_hour=0.5)
    assert c.fixed_per_month() == pytest.approx(0.5 * cost.HOURS_PER_MONTH) and c.energy_per_busy_hour() == 0
    with pytest.raises(ValueError, match="needs usd_per_hour"):
        cost.Hardware(name="x", kind="cloud", source="s", as_of=dt.date(2026, 1, 1))
    with pytest.raises(ValueError, match="needs purchase_usd"):
        cost.Hardware(name="x", kind="owned", source="s", as_of=dt.date(2026, 1, 1))


def test_lora_break_even_machines():
    be = cost.lora_break_even(1000.0, 800.0, None, adapters=(1, 4), loads=(0.1, 0.7, 0.9, 2.0))
    assert be["ratio"] == pytest.approx(0.8) and be["break_even_traffic_per_adapter_tokens_per_s"] == pytest.approx(800)
    rows = {(r["adapters"], r["traffic_per_adapter_share_of_machine"]): r for r in be["rows"]}
    assert (rows[(4, 0.1)]["machines_merged"], rows[(4, 0.1)]["machines_multi_lora"]) == (4, 1)
    assert (rows[(4, 0.7)]["machines_merged"], rows[(4, 0.7)]["machines_multi_lora"]) == (4, 4)  # 2.8/0.8 = 3.5
    assert (rows[(4, 0.9)]["machines_merged"], rows[(4, 0.9)]["machines_multi_lora"]) == (4, 5)  # above r: merged wins
    assert (rows[(1, 2.0)]["machines_merged"], rows[(1, 2.0)]["machines_multi_lora"]) == (2, 3)
    assert all(r["monthly_usd_merged"] is None for r in be["rows"])


def test_shipped_price_list_and_hardware_profiles_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bench"
    prices = cost.load_prices(root / "api_prices.yaml")
    names = {m.name for m in prices.models}
    assert {"gpt-4o-mini", "gpt-4.1-mini", "gpt-5-mini", "claude-haiku-4.5", "gemini-2.5-flash"} <= names
    assert all(m.source.startswith("https://") and m.as_of.year >= 2026 for m in prices.models)
    for f in (root / "hardware").glob("*.yaml"):
        h = cost.load_hardware(f)
        assert h.fixed_per_month() > 0 and h.source


def test_bench_config_levels_and_poisson_needs_a_rate():
    assert BenchConfig().levels() == [4]
    assert BenchConfig(sweep=[1, 2, 4]).levels() == [1, 2, 4]
    assert BenchConfig(mode="burst", requests=12).levels() == [12]
    assert BenchConfig(mode="poisson", rate=2.5).levels() == [2.5]
    with pytest.raises(ValueError, match="needs rate"):
        BenchConfig(mode="poisson")


def test_poisson_schedule_sends_every_request_no_earlier_than_its_seeded_arrival():
    import asyncio

    from ftx.bench.loads import PROFILES

    cfg = BenchConfig(mode="poisson", rate=2000.0, requests=200, warmup=0)
    sent = []

    async def send(i, sem, keep):
        sent.append((i, asyncio.get_running_loop().time()))

    async def go():
        tasks = []
        t0 = asyncio.get_running_loop().time()
        await PROFILES["poisson"].schedule(cfg, 2000.0, np.random.default_rng(7), None, send, tasks)
        await asyncio.gather(*tasks)
        return t0

    t0 = asyncio.run(go())
    gaps = np.random.default_rng(7).exponential(1 / 2000.0, size=200)
    arrivals = np.cumsum(gaps) - gaps[0]
    assert [i for i, _ in sent] == list(range(200))
    # asyncio.sleep never wakes early: each request leaves at or after its arrival time
    assert all(t - t0 >= a - 1e-3 for (_, t), a in zip(sent, arrivals))


def test_synthetic_prompts_have_exact_token_lengths_with_a_tokenizer():
    from ftx.bench import prompts as P
    from ftx.bench.prompts import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    ps = P.synthetic(50, 5, seed=1, tokenizer=tok)
    assert len(ps) == 5 and len(set(ps)) == 5
    assert all(len(tok.encode(p, add_special_tokens=False)) == 50 for p in ps)
    assert P.synthetic(50, 5, seed=1, tokenizer=tok) == ps  # seeded
    assert all(len(p.split()) == 7 for p in P.synthetic(7, 3, seed=0))


def test_synthetic_prompts_are_fresh_per_run_level_and_target_unless_seeded():
    from ftx.bench import prompts as P

    cfg = P.PromptsConfig(source="synthetic", input_tokens=6, count=4)
    a, b = P.PromptSet(synthetic=cfg), P.PromptSet(synthetic=cfg)
    assert a.seed != b.seed and a.get(0, 0) != b.get(0, 0)  # two runs: other prompts
    drawn = [tuple(a.get(j, k)) for j in range(3) for k in range(2)]
    assert len(set(drawn)) == 6 and a.get(1, 1) == a.get(1, 1)  # every level x target its own, stable in a run
    assert a.describe() == {"count": 4, "seed": a.seed, "fresh_per_level": True}
    fixed = P.PromptsConfig(source="synthetic", input_tokens=6, count=4, seed=3)
    assert P.PromptSet(synthetic=fixed).get(2, 0) == P.PromptSet(synthetic=fixed).get(2, 0)  # warm cache on purpose
    held = P.PromptSet(["q1", "q2"])
    assert held.get(0, 0) == held.get(5, 1) == ["q1", "q2"] and held.describe()["seed"] is None


def test_cached_prompt_tokens_are_summed_and_warm_cache_levels_are_warned():
    from ftx.bench import prompts as P

    cached = [dict(rec(0.05, 0.2, inp=100), cached_tokens=c) for c in (90, 99, 0)]
    s = stats.summarize(cached + [rec(0.05, 0.2, inp=100)], 1.0, stats.SLO())  # the last: no cached count
    assert s["cached_input_tokens"] == 189 and s["cached_share"] == pytest.approx(189 / 300)
    assert stats.summarize([rec(0.05, 0.2)], 1.0, stats.SLO())["cached_share"] is None
    shared_prefix = s  # 63% cached: a shared system prompt is what production caches too, no warning
    again = stats.summarize([dict(rec(0.05, 0.2, inp=100), cached_tokens=99)], 1.0, stats.SLO())  # an earlier run's
    repeats = stats.summarize(
        [dict(rec(0.05, 0.2, inp=100), cached_tokens=c, repeat=r) for c, r in ((0, False), (99, True), (99, True))],
        1.0,
        stats.SLO(),
    )
    repeats_not_hit = stats.summarize(  # repeated, but the server had only the shared system prompt cached
        [dict(rec(0.05, 0.2, inp=100), cached_tokens=70, repeat=r) for r in (False, True)], 1.0, stats.SLO()
    )
    lv = lambda level, summary: {"level": level, "summary": summary}  # noqa: E731
    targets = [{"name": "a", "levels": [lv(1, shared_prefix), lv(2, again), lv(4, repeats), lv(8, repeats_not_hit)]}]
    w2, w4 = stats.cache_warnings(targets)
    assert w2.startswith("a at 2: 99% of the prompt tokens came from the server's prompt cache")
    assert w4.startswith("a at 4: 2 of 3 requests repeat a prompt sent earlier in this run") and "(66% of" in w4
    # a fixed prompt list goes on where the last level stopped
    ps = P.PromptSet(list("abcdefg"))
    ps.counts = [2, 3, 3]  # e.g. a burst sweep 2, 3, 3
    assert ps.get(0, 0) == list("abcdefg") and ps.get(1, 0)[:3] == list("cde") and ps.get(2, 0)[:3] == list("fga")
    assert ps.get(0, 1, 2)[:2] == list("cd") and ps.offset(1, 1, 2) == (4 + 3) % 7  # two targets: A then B per level


def test_a_level_stops_sending_at_its_duration():
    import asyncio
    import time

    from ftx.bench.loads import PROFILES

    cfg = BenchConfig(mode="concurrency", concurrency=2, requests=1000, warmup=0, duration_s=0.2)
    sent = []

    async def send(i, sem, keep):
        sent.append(i)
        await asyncio.sleep(0.01)

    async def go():
        tasks = []
        deadline = time.perf_counter() + cfg.duration_s
        await PROFILES["concurrency"].schedule(cfg, 2, np.random.default_rng(0), deadline, send, tasks)
        await asyncio.gather(*tasks)

    asyncio.run(go())
    # 1000 requests of 10 ms at concurrency 2 would take 5 s: the 0.2 s duration stopped the sending early
    assert 2 <= len(sent) < 1000 and sent == list(range(len(sent)))


def test_server_timings_from_llama_server_and_vllm_metrics():
    """llama-server's per-request `timings` and vLLM's histogram deltas become the same means; /metrics text
    (Prometheus format, several label sets) is summed per histogram; an endpoint without vLLM metrics gives None."""
    import http.server
    import threading

    from ftx.bench import server

    t = server.record_timings(
        {"prompt_ms": 50.0, "predicted_ms": 90.0, "predicted_n": 10, "prompt_n": 64, "cache_n": 0}
    )
    assert (
        t["ttft_s"] == pytest.approx(0.05) and t["tpot_s"] == pytest.approx(0.01) and t["e2e_s"] == pytest.approx(0.14)
    )
    assert server.record_timings({"prompt_ms": 1}) is None
    recs = [{"ok": True, "server": t}, {"ok": True, "server": {**t, "ttft_s": 0.07}}, {"ok": False, "server": None}]
    own = server.view(recs, None, None)
    assert own["source"] == "llama-server timings" and own["requests"] == 2 and own["ttft_s"] == pytest.approx(0.06)
    summary = {"ok": 2, "ttft_s": {"mean": 0.066}, "tpot_s": {"mean": 0.01}, "e2e_s": {"mean": 0.168}}
    agree = server.agreement(summary, own)
    assert agree["ttft_s"] == pytest.approx(1.1) and agree["e2e_s"] == pytest.approx(1.2) and agree["same_requests"]

    def metrics(n):  # two label sets (e.g. two model names) of each histogram, after n requests each
        lines = []
        for name in server.VLLM.values():
            for model in ("a", "b"):
                lines += [
                    f"# TYPE {name} histogram",
                    f'{name}_bucket{{model_name="{model}",le="+Inf"}} {n}',
                    f'{name}_count{{model_name="{model}"}} {n}',
                    f'{name}_sum{{model_name="{model}"}} {0.5 * n}',
                ]
        return "\n".join(lines) + "\n"

    pages = {"/metrics": metrics(3)}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write((body or "").encode())

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/v1"
        before = server.scrape(url, "k")
        assert before["e2e_s"] == (3.0, 6.0)
        pages["/metrics"] = metrics(5)
        own = server.view([{"ok": True, "server": None}], before, server.scrape(url, "k"))
        assert own == {"source": "vLLM /metrics", "requests": 4, "ttft_s": 0.5, "tpot_s": 0.5, "e2e_s": 0.5}
        pages.pop("/metrics")
        assert server.scrape(url, "k") is None
    finally:
        srv.shutdown()
