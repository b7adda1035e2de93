"""End to end: serving on llama.cpp behind ftx's gateway. `ftx serve` from a serve config (the quickstart's GGUF,
named from its metadata), queried with the openai client and shut down cleanly; the base GGUF and the GGUF LoRA as
two model names of one endpoint, with OpenAI-style errors."""

import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from .conftest import FTX, REGEX

pytestmark = pytest.mark.e2e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, proc, timeout=180):
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, (
            proc.stdout.read() if proc.poll() is not None else "timeout"
        )
        time.sleep(0.5)


def test_served_model_answers_with_finetuned_behaviour(quickstart_run, heldout, tmp_path):
    import openai
    import psutil

    assert quickstart_run["card"]["serve"]["metrics"]["format_rate"] >= 0.75, quickstart_run["card"]["serve"]
    port, key = free_port(), "test-key-123"
    # a serve config (serve/edge.yaml's shape) whose port the --port flag overrides; paths relative to the file.
    # No `name`: the model is named from the GGUF's metadata (general.name: the recipe's name)
    cfg = tmp_path / "edge.yaml"
    gguf = quickstart_run["dir"] / "model-q4_k_m.gguf"
    (tmp_path / "model.gguf").symlink_to(gguf)
    cfg.write_text("engine: llamacpp\ngguf: model.gguf\nport: 1\nllamacpp: {parallel: 2}\n")
    proc = subprocess.Popen(
        [*FTX, "serve", str(cfg), "--port", str(port), "--api-key", key, "--log", str(tmp_path / "server.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_healthy(port, proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["quickstart"]
        ok = 0
        for m in heldout[:4]:
            r = client.chat.completions.create(model="quickstart", messages=m[:-1], max_tokens=48, temperature=0)
            ok += bool(re.fullmatch(REGEX, r.choices[0].message.content.strip()))
        assert ok >= 3
        chunks = list(
            client.chat.completions.create(
                model="quickstart", messages=heldout[0][:-1], max_tokens=32, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith('{"category"')
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert key not in proc.stdout.read()  # a key given by the user is never printed
    with pytest.raises(ConnectionRefusedError):  # the gateway is gone: nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # and so is the llama-server behind it
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(gguf.resolve()) in (p.info["cmdline"] or [])]


def test_llamacpp_endpoint_adapters_by_model_name_and_openai_errors(quickstart_run, heldout, tmp_path):
    """Base GGUF + the GGUF LoRA as two models of one endpoint: chat and completions, streamed and not; the
    adapter changes the answers; unknown model 404, wrong or missing key 401, /health open."""
    import openai

    from ftx.core.errors import FtxError
    from ftx.serving import ServeSettings, start

    base, lora = quickstart_run["dir"] / "base-f16.gguf", quickstart_run["dir"] / "adapter-f16.gguf"
    with start(ServeSettings(adapters={"sft": lora}), base, "base", tmp_path / "server.log") as ep:
        client = openai.OpenAI(base_url=ep.base_url, api_key=ep.api_key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["base", "sft"]
        p = heldout[0][:-1]
        answers = {}
        for model in ("base", "sft"):
            r = client.chat.completions.create(model=model, messages=p, max_tokens=40, temperature=0)
            chunks = client.chat.completions.create(model=model, messages=p, max_tokens=40, temperature=0, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert streamed == r.choices[0].message.content
            answers[model] = streamed
            c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
            cs = client.completions.create(
                model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
            )
            assert "".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text and c.choices[0].text
        assert re.search(REGEX, answers["sft"]) and not re.search(REGEX, answers["base"])
        with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
            client.chat.completions.create(model="nope", messages=p, max_tokens=4)
        for key in ("wrong", ""):
            req = urllib.request.Request(
                f"{ep.base_url}/models", headers={"Authorization": f"Bearer {key}"} if key else {}
            )
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 401
        assert urllib.request.urlopen(ep.base_url.removesuffix("/v1") + "/health", timeout=10).status == 200
    for adapters, msg in (
        ({"x": tmp_path / "missing.gguf"}, "no such file"),
        ({"x": base}, "not a GGUF LoRA adapter"),
        ({"base": lora}, "base model's served name"),
    ):
        with (
            pytest.raises(FtxError, match=msg),
            start(ServeSettings(adapters=adapters), base, "base", tmp_path / "b.log"),
        ):
            pass
    with pytest.raises(ValueError, match="adapter name"):  # a name that is a path never reaches the engine
        ServeSettings(adapters={"../x": lora})


def test_eval_ab_side_by_side_with_metrics_a_report_and_a_judge(quickstart_run, tmp_path):
    """`ftx eval ab`: the base model's packaged GGUF against the quickstart run (its selected GGUF), both served
    on llama-server for the comparison, on the held-out prompts with their references; the base GGUF as a judge
    that must prove itself (it cannot, and the report says so)."""
    import json

    from ftx.core.basemodel import packaged_gguf

    from .conftest import ROOT

    base, out = packaged_gguf("smollm2-135m-instruct"), tmp_path / "ab"
    heldout = ROOT / "recipes" / "data" / "quickstart_heldout.jsonl"
    proc = subprocess.run(
        [*FTX, "eval", "ab", "judge.max_tokens=32", "--a", f"base={base}", "--b", f"tuned={quickstart_run['dir']}"]
        + ["--prompts", str(heldout), "--limit", "8", "--max-tokens", "48", "--judge-gguf", str(base)]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 8 and s["a"]["name"] == "base" and s["b"]["name"] == "tuned"
    f1 = s["metrics"]["token_f1"]
    assert f1["tuned"] > f1["base"] and s["deltas"]["token_f1"]["tuned"]["delta"] == pytest.approx(
        f1["tuned"] - f1["base"]
    )
    assert s["identical"] < 0.5  # the fine-tune answers in its JSON format, the base model does not
    rows = [json.loads(line) for line in (out / "answers.jsonl").open()]
    assert len(rows) == 8 and sum(bool(re.fullmatch(REGEX, r["tuned"])) for r in rows) >= 6
    assert rows == sorted(rows, key=lambda r: int(r["id"]))  # prompt order, every answer with its reference
    assert all(r["reference"] and r["base"] != r["tuned"] for r in rows[:4])
    j = s["judge"]
    assert j["pairs"] == 8 and not j["reliable"] and j["verdict"] is None
    assert len((out / "judge.jsonl").read_text().splitlines()) == 8 + 4
    html = (out / "report.html").read_text()
    assert "&#34;category&#34;" in html and '{"category"' not in html  # model output escaped in the HTML
    md = (out / "summary.md").read_text()
    assert "# tuned vs base (8 prompts" in md and "## Where they differ most" in md and "NOT RELIABLE" in md
    assert md in proc.stdout


def test_hot_swap_on_sighup_under_load_fails_no_request(quickstart_run, heldout, tmp_path):
    """`ftx serve` (llama.cpp, base GGUF + the GGUF LoRA) under load from two clients; the serve config gains a
    second adapter and the server gets SIGHUP: a new llama-server starts, the gateway switches to it and drains
    the old one, and no request fails. A reload whose config is broken keeps the running engine."""
    import threading

    import openai
    import psutil

    port, key = free_port(), "swap-key"
    base, lora = quickstart_run["dir"] / "base-f16.gguf", quickstart_run["dir"] / "adapter-f16.gguf"
    cfg = tmp_path / "edge.yaml"
    config = f"engine: llamacpp\ngguf: {base}\nname: base\nllamacpp: {{parallel: 2}}\nadapters:\n  sft: {lora}\n"
    cfg.write_text(config)
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [*FTX, "serve", str(cfg), "--port", str(port), "--api-key", key, "--log", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
    done, errors, spans = threading.Event(), [], []

    def load(models):
        i = 0
        while not done.is_set():
            t0 = time.monotonic()
            try:
                r = client.chat.completions.create(
                    model=models[i % len(models)], messages=heldout[i % 8][:-1], max_tokens=24, temperature=0
                )
                assert r.choices[0].message.content
            except Exception as e:  # noqa: BLE001 - every failure counts
                errors.append(repr(e))
            spans.append((t0, time.monotonic()))
            i += 1

    try:
        wait_healthy(port, proc)
        workers = [threading.Thread(target=load, args=(m,)) for m in (["sft", "base"], ["base", "sft"])]
        for w in workers:
            w.start()
        time.sleep(2)
        cfg.write_text(config + f"  sft2: {lora}\n")
        swap_at = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while [m.id for m in client.models.list().data] != ["base", "sft", "sft2"]:
            assert time.monotonic() < deadline and proc.poll() is None, "no reload"
            time.sleep(0.2)
        swapped_at = time.monotonic()
        time.sleep(2)
        done.set()
        for w in workers:
            w.join(timeout=120)
        assert errors == [] and len(spans) >= 6, errors
        # requests were running while the new engine started and the old one drained
        assert any(t0 < swapped_at and t1 > swap_at for t0, t1 in spans)
        p = heldout[0][:-1]
        same = [
            client.chat.completions.create(model=m, messages=p, max_tokens=32, temperature=0).choices[0].message.content
            for m in ("sft", "sft2")
        ]
        assert same[0] == same[1] and re.search(REGEX, same[0])  # the same adapter file under a second name
        assert (tmp_path / "server.log.swap-1").is_file()
        # a broken config on the next SIGHUP: reported, and the running engine keeps serving
        cfg.write_text(config + f"  bad: {tmp_path / 'missing.gguf'}\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(3)
        assert [m.id for m in client.models.list().data] == ["base", "sft", "sft2"]
    finally:
        done.set()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    out = proc.stdout.read()
    assert "reloaded" in out and "reload failed" in out and "missing.gguf" in out, out[-2000:]
    # one llama-server at a time: the first was stopped after the swap, the second at shutdown
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(base) in (p.info["cmdline"] or [])]
