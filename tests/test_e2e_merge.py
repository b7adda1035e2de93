"""End to end: the merged model equals base + adapter; `ftx merge` reports how far a QLoRA merge is from the 4-bit
model that was trained, and merges a weighted combination of two adapters exactly."""

import json
import subprocess

import pytest

from .conftest import FTX

pytestmark = pytest.mark.e2e


def test_merged_logits_match_base_plus_adapter(hf, heldout, quickstart_run):
    from ftx.core import chat
    from ftx.core.models import compare_logits, token_logits

    tok, peft_model, merged = hf
    seqs = [chat.render(tok, m, 512)["input_ids"] for m in heldout[:8]]  # tokens the merge check never saw
    cmp = compare_logits(token_logits(peft_model, seqs), token_logits(merged, seqs))
    assert cmp["max_abs_diff"] < 1e-3 and cmp["top1_agreement"] == 1.0, cmp
    m = quickstart_run["card"]["merge"]
    assert m["max_abs_logit_diff"] < 1e-3 and m["tokens_checked"] >= 256 and m["top1_agreement"] == 1.0
    a = m["adapter"]  # the adapter report: plain LoRA on every linear layer, loadable everywhere
    assert (a["rank"], a["alpha"], a["trained_on"], a["modules_to_save"], a["embeddings"]) == (
        8,
        16,
        "full precision",
        [],
        [],
    )
    assert a["lora_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert all(t["supported"] for t in a["targets"]) and len(a["targets"]) == 4
    assert "| vLLM --lora-modules | yes |" in (quickstart_run["dir"] / "run_card.md").read_text()


def test_qlora_merge_reports_the_difference_from_the_4bit_model(quickstart_run, hf, qlora_run, base_dir, tmp_path):
    """The QLoRA adapter merged onto the full-precision base is not the model that was trained (NF4 base +
    adapter): the merge stage measures how far apart they are. Recomputed here from the saved merged model."""
    from peft import PeftModel

    from ftx.core.models import check_sequences, compare_logits, load_base, token_logits

    adapter, val = qlora_run[0] / "adapter", quickstart_run["dir"] / "stages" / "data" / "val.jsonl"
    proc = subprocess.run(
        [
            *FTX,
            "merge",
            "--base",
            "smollm2-135m-instruct",
            "--adapter",
            str(adapter),
            "--val",
            str(val),
            "--out",
            str(tmp_path / "m"),
            "--qlora",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert r["max_abs_logit_diff"] < 1e-3  # the merge itself is exact
    assert r["adapter"]["trained_on"] == "4-bit (QLoRA)" and r["adapter"]["lora_modules"] == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    q = r["qlora"]
    assert q["base_vs_4bit_base"]["mean_kld"] > 1e-3 and q["merged_vs_4bit"]["mean_kld"] > 1e-3  # NF4 is lossy
    seqs = check_sequences(hf[0], val, 512)
    trained = PeftModel.from_pretrained(load_base(base_dir, "qlora", "cpu")[0], adapter).eval()
    merged, _ = load_base(tmp_path / "m" / "merged", "lora", "cpu")
    cmp = compare_logits(token_logits(trained, seqs), token_logits(merged, seqs))
    # bitsandbytes' CPU 4-bit path computes in bf16 and its kernels differ between processes on this CPU: measured
    # 0.589 here against 0.601 in the merge process (6 of 491 tokens), max difference 26.2 against 25.7
    assert cmp["top1_agreement"] == pytest.approx(q["merged_vs_4bit"]["top1_agreement"], abs=0.03)
    assert cmp["max_abs_diff"] == pytest.approx(q["merged_vs_4bit"]["max_abs_diff"], rel=0.05)


def test_weighted_combination_of_two_adapters_is_exact(quickstart_run, qlora_run, base_dir, tmp_path):
    """`cat` combination: merged W == W0 + sum_i w_i * (alpha_i / r_i) * B_i A_i, checked from the adapter files
    for every adapted matrix; the merge stage's own logit check passes too."""
    from safetensors.torch import load_file

    a1, a2 = quickstart_run["dir"] / "adapter", qlora_run[0] / "adapter"
    val = quickstart_run["dir"] / "stages" / "data" / "val.jsonl"
    proc = subprocess.run(
        [
            *FTX,
            "merge",
            "--base",
            "smollm2-135m-instruct",
            "--adapter",
            str(a1),
            "--weight",
            "0.6",
            "--combine",
            f"{a2}:0.7",
            "--val",
            str(val),
            "--out",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert [a["weight"] for a in r["adapters"]] == [0.6, 0.7] and r["max_abs_logit_diff"] < 1e-3
    base = load_file(base_dir / "model.safetensors")
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
