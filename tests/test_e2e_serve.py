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
