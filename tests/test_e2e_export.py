"""End to end: the GGUF export of the quickstart run. The f16 GGUF equals the HF model and tokenizes like it, the
quant ladder and its quality gate (every figure recomputed from raw llama.cpp logits), metadata, the GGUF LoRA,
the proven Modelfile; an importance-matrix export and a gate nothing passes, both from the cache."""

import json
import math
import re
import subprocess

import numpy as np
import pytest

from .conftest import ftx_cmd, ftx_run

pytestmark = pytest.mark.e2e


def test_f16_gguf_agrees_with_hf_and_tokenizers_match(quickstart_run, hf, heldout):
    from llama_cpp import Llama

    from ftx.core import chat, gguf
    from ftx.core.models import compare_logits, token_logits

    tok, _, merged = hf
    seqs = [chat.render(tok, m, 512)["input_ids"] for m in heldout[:12]]
    cmp = compare_logits(gguf.logits(quickstart_run["dir"] / "model-f16.gguf", seqs), token_logits(merged, seqs))
    assert cmp["top1_agreement"] >= 0.99, cmp
    assert quickstart_run["card"]["export"]["files"][0]["top1_agreement"] >= 0.99
    llm = Llama(model_path=str(quickstart_run["dir"] / "model-f16.gguf"), n_ctx=256, vocab_only=True, verbose=False)
    text = "".join(m[0]["content"] + " 12 345 6789\n" for m in heldout)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]


def test_quantized_files_get_smaller(quickstart_run):
    size = {q: (quickstart_run["dir"] / f"model-{q}.gguf").stat().st_size for q in ("f16", "q8_0", "q6_k", "q4_k_m")}
    assert size["q4_k_m"] < size["q6_k"] < size["q8_0"] < size["f16"], size
    with open(quickstart_run["dir"] / "model-q4_k_m.gguf", "rb") as f:
        assert f.read(4) == b"GGUF"


def test_gguf_metadata_carries_name_license_template_and_lineage(quickstart_run):
    from ftx.core.gguf import fields

    key = quickstart_run["manifest"]["stages"]["export"]["key"]
    for q in ("f16", quickstart_run["card"]["export"]["selected"]):  # llama-quantize copies the metadata
        value = fields(
            quickstart_run["dir"] / f"model-{q}.gguf",
            ("general.name", "general.license", "general.tags", "tokenizer.chat_template"),
        )
        assert value["general.name"] == "quickstart" and value["general.license"] == "apache-2.0", value
        assert f"ftx-lineage:{key}" in value["general.tags"]
        assert "<|im_start|>" in value["tokenizer.chat_template"]
    assert quickstart_run["card"]["export"]["lineage"] == key


def test_gguf_lora_adapter_in_llama_cpp_matches_hf_peft(quickstart_run, hf, heldout):
    from ftx.core import chat, gguf
    from ftx.core.models import compare_logits, token_logits

    run_dir = quickstart_run["dir"]
    lora = quickstart_run["card"]["export"]["packaging"]["lora_adapter"]
    assert lora["top1_agreement"] >= 0.99 and lora["adapter_size_bytes"] < 20e6
    tok, peft_model, _ = hf
    seqs = [chat.render(tok, m, 512)["input_ids"] for m in heldout[:8]]
    reference = token_logits(peft_model, seqs)  # HF base + LoRA
    with_adapter = compare_logits(
        gguf.logits(run_dir / "base-f16.gguf", seqs, lora=run_dir / "adapter-f16.gguf"), reference
    )
    without = compare_logits(gguf.logits(run_dir / "base-f16.gguf", seqs), reference)
    assert with_adapter["top1_agreement"] >= 0.99, with_adapter
    # the agreement comes from the adapter: llama.cpp's base alone predicts the fine-tuned tokens far less often
    assert without["top1_agreement"] < with_adapter["top1_agreement"] - 0.05, without
    mf = (run_dir / "Modelfile.adapter").read_text()
    assert "FROM ./base-f16.gguf" in mf and "ADAPTER ./adapter-f16.gguf" in mf


def test_modelfile(quickstart_run):
    run_dir = quickstart_run["dir"]
    mf = (run_dir / "Modelfile").read_text()
    ex = quickstart_run["card"]["export"]
    assert f"FROM ./model-{ex['selected']}.gguf" in mf and (run_dir / f"model-{ex['selected']}.gguf").exists()
    assert 'PARAMETER stop "<|im_end|>"' in mf and "PARAMETER num_ctx 8192" in mf  # the model's context length
    assert ex["packaging"]["modelfile"]["num_ctx_source"] == "the model's context length"
    assert "PARAMETER temperature" not in mf  # SmolLM2's generation_config sets no sampling: Ollama's defaults
    assert "<|im_start|>{{ .Role }}" in mf and "{{ .Content }}<|im_end|>" in mf
    proof = json.loads((run_dir / "Modelfile.proof.json").read_text())
    assert proof["proven"] and proof["family"] == "chatml"
    assert [r["status"] for r in proof["rows"]] == ["same"] * 5
    assert ex["packaging"]["modelfile"]["family"] == "chatml"
    assert "chatml family, proven" in (card := (run_dir / "run_card.md").read_text())
    # the variant without TEMPLATE, for an Ollama that renders the GGUF's own template: proven on llama.cpp
    assert proof["gguf_template"] and ex["packaging"]["modelfile"]["gguf_template_file"] == "Modelfile.gguf-template"
    for name in ("Modelfile.gguf-template", "Modelfile.adapter.gguf-template"):
        variant = (run_dir / name).read_text()
        assert "\nTEMPLATE" not in variant and "SYSTEM" not in variant and 'PARAMETER stop "<|im_end|>"' in variant
    assert "Without TEMPLATE: `Modelfile.gguf-template`" in card


def test_quality_gate_measures_every_quant_and_serves_the_smallest_passing(quickstart_run, heldout, tmp_path):
    from transformers import AutoTokenizer

    from ftx.core import chat, gguf
    from ftx.formats import gate

    run_dir, ex = quickstart_run["dir"], quickstart_run["card"]["export"]
    ref, quants = ex["files"][0], {f["name"]: f for f in ex["files"][1:]}
    assert ref["name"] == "f16" and ref["ppl"] > 1 and ref["mean_kld"] is None and ex["eval_tokens"] > 1000
    budgets = ex["gate"]
    for f in quants.values():
        assert 0 <= f["mean_kld"] <= f["p99_kld"] and 0 < f["same_top"] <= 1
        within = f["mean_kld"] <= budgets["max_mean_kld"] and abs(f["ppl_ratio"] - 1) <= budgets["max_ppl_ratio"] - 1
        within = within and f["clean_stop_rate"] >= 0.95  # and it stops where the runtime stops it
        assert f["passed"] is within, f  # the verdict follows from the figures and the budgets (PPL both ways)
        assert f["all_mean_kld"] is not None and f["all_ppl_ratio"] > 0
    # the gate scores the answers: SmolLM2's template puts its default system prompt into every conversation,
    # which the all-token figures count once
    sc = ex["scored"]
    assert sc["assistant"] + sc["prompt"] == sc["positions"] == ex["eval_tokens"] and sc["assistant"] > 200
    assert sc["prompt_repeated"] > 0.3 * sc["prompt"] and sc["assistant_repeated"] == 0, sc
    assert quants["q8_0"]["mean_kld"] < quants["q4_k_m"]["mean_kld"]  # fewer bits, further from f16
    passing = sorted((f for f in quants.values() if f["passed"]), key=lambda f: f["size_bytes"])
    assert passing and ex["selected"] == passing[0]["name"]
    assert quickstart_run["card"]["serve"]["served"] == f"model-{ex['selected']}.gguf"  # serve.quant: auto
    # the metrics themselves: f16 against itself is ~0; q4_k_m's KL recomputed here from raw llama.cpp logits
    tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    seqs = [chat.render(tok, m, 512)["input_ids"] for m in heldout[:6]]
    f16, q4 = run_dir / "model-f16.gguf", run_dir / "model-q4_k_m.gguf"
    ppl = gate.save_reference(gguf.logprobs(f16, seqs), seqs, tmp_path / "ref.npy")
    same = gate.compare(gguf.logprobs(f16, seqs), tmp_path / "ref.npy", ppl)
    assert same["mean_kld"] < 1e-3 and same["same_top"] > 0.99 and same["ppl_ratio"] == pytest.approx(1, abs=1e-3)
    q4_metrics = gate.compare(gguf.logprobs(q4, seqs), tmp_path / "ref.npy", ppl)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    keep = np.concatenate([np.arange(len(s) - 1) + sum(map(len, seqs[:i])) for i, s in enumerate(seqs)])
    p = log_softmax(gguf.logits(f16, seqs).astype(np.float64))[keep]
    q = log_softmax(gguf.logits(q4, seqs).astype(np.float64))[keep]
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert q4_metrics["mean_kld"] == pytest.approx(kl.mean(), rel=0.02, abs=2e-4)
    assert q4_metrics["same_top"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean(), abs=0.01)


def test_every_artifact_stops_on_the_stop_set_and_a_foreign_end_token_is_caught(quickstart_run, heldout):
    """Each GGUF answered held-out prompts through llama.cpp and ended them on <|im_end|>, the end token the
    model declares, its GGUF metadata names and the Modelfile stops on. A model that declares another end token
    than it emits (as one whose training data ended turns differently) fails the export, or extends the set."""
    from transformers import AutoTokenizer

    from ftx.core.chat import prompt_ids
    from ftx.core.errors import FtxError
    from ftx.formats import FORMATS
    from ftx.formats import termination as T

    ex = quickstart_run["card"]["export"]
    t = ex["termination"]
    assert t["stop_set"] == t["declared"] == t["artifact_end_ids"] == ["<|im_end|>"] and t["template_matches"]
    for f in ex["files"]:
        assert f["clean_stop_rate"] >= 0.95 and sum(f["ends"].values()) == t["prompts"], f
        # the same answers scored for the task: the fine-tune's format, on every file that ships
        assert {"format_rate", "exact_rate", "token_f1", "rouge_l", "chrf", "answer_words", "truncated"} == set(
            f["task"]
        )
        assert f["task"]["format_rate"] >= 0.75 and f["task"]["truncated"] == 0, f
        assert "answer_words" not in f["task_ratio"] and "truncated" not in f["task_ratio"]  # not quality metrics
        assert f["flips"]["flips"] <= t["prompts"] and 0 <= f["flips"]["flip_rate"] <= 1
    assert ex["files"][0]["flips"]["flips"] == 0 and ex["files"][0]["task_ratio"]["format_rate"] == 1.0
    card = (quickstart_run["dir"] / "run_card.md").read_text()
    # one table: the merged HF model and every file, answers cut at eval.max_new_tokens, intervals, paired deltas
    tt = ex["task_table"]
    assert tt["columns"] == ["merged"] + [f["name"] for f in ex["files"]] and tt["max_tokens"] == 48
    fmt = tt["metrics"]["format_rate"]
    assert fmt["merged"] >= 0.75 and all(lo <= fmt[c] <= hi for c, (lo, hi) in tt["intervals"]["format_rate"].items())
    assert set(tt["deltas"]["token_f1"]) == {f["name"] for f in ex["files"]}  # each file against the merged model
    assert "| | merged | f16 | q8_0 | q6_k | q4_k_m | Δ f16 (95% CI) |" in card
    assert 'PARAMETER stop "<|im_end|>"' in (quickstart_run["dir"] / "Modelfile").read_text()
    assert "Termination: each file answered" in (quickstart_run["dir"] / "run_card.md").read_text()
    tok = AutoTokenizer.from_pretrained(quickstart_run["dir"] / "merged")
    prompts = [prompt_ids(tok, m[:-1]) for m in heldout[:3]]
    f16 = [("f16", quickstart_run["dir"] / "model-f16.gguf")]
    wrong = {0: "<|endoftext|>"}  # declared, but the fine-tune ends its turns with <|im_end|>
    with pytest.raises(FtxError, match=r"ends only 0% of 3 .*ended on <\|im_end\|> 3x"):
        T.check(FORMATS["gguf"], f16, prompts, wrong, T.Termination(), tok.chat_template)
    r = T.check(FORMATS["gguf"], f16, prompts, wrong, T.Termination(other_end_token="extend"), tok.chat_template)
    assert r.extended == ["<|im_end|>"] and r.files["f16"].clean_stop_rate == 1.0 and "added to the stop set" in r.note


def test_imatrix_quantization_uses_the_training_conversations(quickstart_run):
    """The importance matrix of the training conversations, used by the ladder and by a quant search to a size
    budget (export.target: one type per tensor kind here, scored on 128 training tokens, one refining step, to
    keep it short)."""
    from ftx.core import gguf

    run_dir, manifest = ftx_run(
        quickstart_run["out"],
        "export.gguf.imatrix=true",
        "export.target={max_bits_per_weight: 5.5, blocks: 1, search_tokens: 128, refine_evals: 1}",
        "export.gguf.imatrix_chunks=16",
        "export.eval_tokens=1024",
        "export.modelfile=null",
        "export.gguf.quants=[q4_k_m]",
        "export.quality_gate=null",
        "export.lora_adapter=false",
        "export.termination=null",
        "--until",
        "export",
    )
    assert manifest["stages"]["merge"]["cached"] and not manifest["stages"]["export"]["cached"]
    ex = json.loads((run_dir / "run_card.json").read_text())["export"]
    assert (
        ex["extras"]["imatrix"] == "imatrix.gguf"
        and (run_dir / "stages" / "export" / "imatrix.gguf").stat().st_size > 0
    )
    # no gate: every variant stays; the one searched to the user's budget is the one served
    assert ex["gate"] is None and [f["name"] for f in ex["files"]] == ["f16", "q4_k_m", "target"]
    assert ex["selected"] == "target" and ex["files"][1]["passed"] is None
    # the importance matrix changes the quantized weights
    plain, weighted = quickstart_run["dir"] / "model-q4_k_m.gguf", run_dir / "model-q4_k_m.gguf"
    assert plain.stat().st_size > 0 and plain.read_bytes() != weighted.read_bytes()
    names = " ".join(p.name for p in (run_dir / "stages" / "export").iterdir())
    assert "calibration" not in names and "candidate" not in names  # scratch removed
    # the searched file: within its budget (5.5 bits per weight of tensor data, plus the metadata); one type per
    # tensor kind (blocks: 1), measured at two types each; its every tensor's type in the overrides file
    s, target = ex["search"], run_dir / "model-target.gguf"
    tensors = gguf.read_header(target).tensors
    weights = sum(math.prod(dims) for _, dims, _, _ in tensors)
    kinds = {"token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert target.stat().st_size == s["size_bytes"] <= s["budget_bytes"] and set(s["types"]) == kinds
    assert s["budget_bytes"] > int(5.5 * weights / 8) and s["size_bytes"] > 0.9 * s["budget_bytes"]  # spent
    assert s["evaluations"] == 1 + 2 * 8 + len(s["tried"]) + len(s["refine"]) and len(s["refine"]) <= 1
    # llama.cpp's largest mixture within 5.5 bpw here, as it is and with its types per group
    assert [t["name"] for t in s["tried"]][:2] == ["allocation", "Q4_0"]
    assert all(k[0] > 0 and k[2] > 0 and k[-1] is None for k in s["sensitivity"].values())
    best = min(t["mean_kld"] for t in s["tried"] if t["size_bytes"] <= s["budget_bytes"])
    assert s["mean_kld"] <= best and (s["kept"] == "refined") == (s["mean_kld"] < best)
    kept_steps = [r["mean_kld"] for r in s["refine"] if r["kept"]]
    assert kept_steps == sorted(kept_steps, reverse=True)  # a step is kept only if it measured better
    if s["kept"] != "Q4_0":  # a per-group candidate: each tensor has its group's type
        for name, dims, qtype, _ in tensors:
            m = re.fullmatch(r"(?:blk\.\d+\.)?(\w+)\.weight", name)
            if len(dims) > 1:
                assert qtype == s["types"][m.group(1)].lower(), (name, qtype)
    lines = (run_dir / s["overrides_file"]).read_text().splitlines()
    assert lines == [f"^{re.escape(n)}$={t}" for n, dims, t, _ in tensors if len(dims) > 1]
    card = (run_dir / "run_card.md").read_text()
    assert "Quant search to the size budget (export.target)" in card and f"Kept: **{s['kept']}**" in card
    assert f"| ffn_down | {s['types']['ffn_down']} |" in card


def test_quality_gate_that_nothing_passes_fails_the_export_cleanly(quickstart_run):
    before = set((quickstart_run["out"] / ".cache" / "export").iterdir())
    proc = subprocess.run(
        ftx_cmd(
            quickstart_run["out"],
            "export.quality_gate.max_mean_kld=1e-7",
            "export.gguf.quants=[q4_k_m]",
            "export.eval_tokens=1024",
            "export.termination=null",
            "--until",
            "export",
        ),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 2
    assert "no quant passes export.quality_gate" in proc.stderr and "q4_k_m: KLD" in proc.stderr
    assert set((quickstart_run["out"] / ".cache" / "export").iterdir()) == before  # no partial or temp dir left
