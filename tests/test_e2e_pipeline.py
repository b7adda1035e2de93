"""End to end, real components: the quickstart recipe (fewer steps) on the real SmolLM2-135M through the CLI. The
run itself, its lineage and run card, the cache across runs, resume after SIGKILL, early stopping."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import REGEX, ROOT, STEPS, ftx_cmd, ftx_run

pytestmark = pytest.mark.e2e


def test_manifest_records_lineage(quickstart_run):
    from ftx.core.cache import sha256_file

    m = quickstart_run["manifest"]
    assert list(m["stages"]) == ["data", "train", "eval", "merge", "export", "serve", "bench"]
    assert all(not s["cached"] and s["wall_s"] > 0 and s["peak_rss_mb"] > 0 for s in m["stages"].values())
    assert m["inputs"]["data.path"]["sha256"] == sha256_file(Path(m["inputs"]["data.path"]["path"]))
    assert m["inputs"]["recipe"]["sha256"] == sha256_file(ROOT / "recipes" / "quickstart.yaml")
    assert (
        len(m["inputs"]["base_model"]["sha256"]) == 64 and m["inputs"]["base_model"]["name"] == "smollm2-135m-instruct"
    )
    assert m["config"]["train"]["max_steps"] == STEPS and f"train.max_steps={STEPS}" in m["overrides"]
    for pkg in ("torch", "transformers", "peft", "llama_cpp_python", "gguf"):
        assert m["versions"][pkg], pkg
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert m["git"]["commit"] == head and isinstance(m["git"]["dirty"], bool)
    md = (quickstart_run["dir"] / "run_card.md").read_text()
    for section in (
        "## Stages",
        "## Data",
        "## Training",
        "## Base vs fine-tuned",
        "## Merge check",
        "## Export (gguf)",
        "## Served",
        "## Bench",
    ):
        assert section in md
    for s in quickstart_run["card"]["stages"]:  # every stage row has its headline
        assert s["headline"] and f"| {s['name']} | ran |" in md


def test_training_artifacts(quickstart_run):
    from transformers import AutoTokenizer

    from ftx.core import chat

    run_dir, card = quickstart_run["dir"], quickstart_run["card"]
    rows = [json.loads(line) for line in (run_dir / "stages" / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == STEPS and len(vals) >= 2
    assert vals[-1] < vals[0] and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert card["train"]["final_loss"] == losses[-1] and card["train"]["train_loss"] == pytest.approx(np.mean(losses))
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # trained tokens are response tokens of the training batches only (not eval batches)
    tok = AutoTokenizer.from_pretrained(quickstart_run["manifest"]["inputs"]["base_model"]["path"])
    per_row = [
        sum(x != -100 for x in chat.render(tok, m, 512)["labels"])
        for m in chat.read_split(run_dir / "stages" / "data" / "train.jsonl")
    ]
    expected = STEPS * quickstart_run["manifest"]["config"]["train"]["batch_size"] * np.mean(per_row)
    assert 0.85 * expected < card["train"]["trained_tokens"] < 1.15 * expected
    assert {p.name for p in (run_dir / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}


def test_a_run_logged_to_a_file_shows_plain_progress_lines(quickstart_run):
    """Output redirected (CI, nohup): training prints a plain line per logged step or 30 s, not a terminal bar
    at the end; and plain LoRA does not print bitsandbytes' kernels warning."""
    err = quickstart_run["stderr"]
    lines = [line for line in err.splitlines() if re.match(rf"train \d+/{STEPS} ", line)]
    assert len(lines) >= 3 and all("elapsed" in line for line in lines), err[-2000:]
    assert any("loss=" in line and "tokens_per_s=" in line for line in lines)
    assert "\x1b[" not in err  # no terminal control codes in a log file
    assert "gemm_4bit" not in err and "kernels-community" not in err


def test_fine_tuning_changes_behaviour_on_heldout(quickstart_run):
    m = quickstart_run["card"]["eval"]["metrics"]
    assert m["format_rate"]["base"] <= 0.2 and m["format_rate"]["finetuned"] >= 0.8, m
    assert m["val_loss"]["finetuned"] < m["val_loss"]["base"]
    assert m["val_perplexity"]["finetuned"] == pytest.approx(np.exp(m["val_loss"]["finetuned"]))
    # 95% intervals per model, and the paired difference: the fine-tune's gain is not noise of 24 prompts
    ev = quickstart_run["card"]["eval"]
    for metric in ("format_rate", "exact_rate", "token_f1"):
        for model, (lo, hi) in ev["intervals"][metric].items():
            assert lo <= m[metric][model] <= hi, (metric, model)
    gain = ev["deltas"]["format_rate"]["finetuned"]
    assert gain["delta"] == pytest.approx(m["format_rate"]["finetuned"] - m["format_rate"]["base"])
    assert 0.5 < gain["low"] <= gain["delta"] <= gain["high"], gain
    assert m["token_f1"]["finetuned"] > m["token_f1"]["base"]  # JSON answers share words with the references
    md = (quickstart_run["dir"] / "run_card.md").read_text()
    assert re.search(r"\| follows the trained format \| \d+%( \[[^]]*\])? \| (8|9|10)\d?%", md)
    assert "Δ fine-tuned (95% CI)" in md


def test_adapter_loads_with_peft_and_gives_the_trained_behaviour(hf, heldout):
    from ftx.core.models import generate

    tok, peft_model, _ = hf
    prompts = [m[:-1] for m in heldout[:6]]
    tuned = generate(peft_model, tok, prompts, 32)
    with peft_model.disable_adapter():
        base = generate(peft_model, tok, prompts, 32)
    assert sum(bool(re.fullmatch(REGEX, t)) for t in tuned) >= 5, tuned
    assert not any(re.fullmatch(REGEX, b) for b in base), base  # the behaviour comes from the adapter


def test_second_run_hits_the_cache(quickstart_run):
    run_dir, manifest = ftx_run(quickstart_run["out"])
    assert run_dir != quickstart_run["dir"]
    assert all(s["cached"] for s in manifest["stages"].values()), manifest["stages"]
    assert {k: s["key"] for k, s in manifest["stages"].items()} == {
        k: s["key"] for k, s in quickstart_run["manifest"]["stages"].items()
    }
    assert manifest["inputs"]["base_model"]["path"] == quickstart_run["manifest"]["inputs"]["base_model"]["path"]


def test_changed_train_settings_rerun_train_only_and_early_stopping_keeps_the_best(quickstart_run):
    run_dir, manifest = ftx_run(
        quickstart_run["out"],
        "train.max_steps=4",
        "train.batch_size=2",
        "train.eval_every=1",
        "train.early_stopping_patience=1",
        "train.learning_rate=5e-2",
        "--until",
        "train",
    )
    st = manifest["stages"]
    assert set(st) == {"data", "train"} and st["data"]["cached"] and not st["train"]["cached"]
    assert st["train"]["key"] != quickstart_run["manifest"]["stages"]["train"]["key"]
    res = json.loads((run_dir / "run_card.json").read_text())["train"]
    vals = {
        r["step"]: r["val_loss"]
        for r in map(json.loads, (run_dir / "stages" / "train" / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    }
    best = min((s for s in vals if s > 0), key=vals.get)
    assert res["stopped_early"] and res["steps"] < 4, res
    assert res["best_step"] == best and res["val_loss"] == pytest.approx(vals[best])


def test_training_killed_with_sigkill_resumes_to_the_same_loss(quickstart_run):
    """The uninterrupted run, then the same stage again (--force train) killed after a checkpoint, then resumed:
    the same steps, the same val loss and final training loss, the same cache key; checkpoints cleaned up."""
    import os

    out = quickstart_run["out"]
    extra = (
        "train.max_steps=3",
        "train.batch_size=2",
        "train.eval_every=3",
        "train.save_every=1",
        "train.learning_rate=2e-3",
        "--until",
        "train",
    )
    ref_dir, ref = ftx_run(out, *extra)
    runs_before = set(out.glob("quickstart/*/manifest.json"))
    proc = subprocess.Popen(
        ftx_cmd(out, *extra, "--force", "train"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    key = ref["stages"]["train"]["key"]
    deadline = time.time() + 600
    while not list(out.glob(f".cache/train/{key}.checkpoints/checkpoint-1/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "training ended before checkpoint-1"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert set(out.glob("quickstart/*/manifest.json")) == runs_before  # nothing finished, nothing claimed
    run_dir, manifest = ftx_run(out, *extra, "--force", "train")
    res = json.loads((run_dir / "run_card.json").read_text())["train"]
    ref_res = json.loads((ref_dir / "run_card.json").read_text())["train"]
    assert res["resumed_from_step"] in (1, 2) and ref_res["resumed_from_step"] is None
    assert res["steps"] == ref_res["steps"] == 3
    assert res["val_loss"] == pytest.approx(ref_res["val_loss"], rel=0.01)
    assert res["final_loss"] == pytest.approx(ref_res["final_loss"], rel=0.01)
    assert manifest["stages"]["train"]["key"] == key
    assert not list(out.glob(".cache/train/*.checkpoints"))  # cleaned up once the stage finished
    assert not list(out.glob(f".cache/train/.{key}.tmp-*"))  # and the killed run's half-written stage dir


def test_eval_scores_overlap_and_forgetting(quickstart_run):
    """The eval stage's other figures on the shared run: ROUGE-L/chrF with their libraries, answer length and
    truncation; IFEval answered by both models (the vendored checkers, paired intervals, a table per type) and the
    label-free drift figure."""
    ev = quickstart_run["card"]["eval"]
    m = ev["metrics"]
    for metric in ("rouge_l", "chrf", "answer_words", "truncated"):
        assert set(m[metric]) == {"base", "finetuned"}, metric
    assert m["rouge_l"]["finetuned"] > m["rouge_l"]["base"] and m["chrf"]["finetuned"] > m["chrf"]["base"]
    assert m["answer_words"]["finetuned"] < m["answer_words"]["base"]  # one short JSON object per answer
    assert ev["provenance"]["rouge_l"].startswith("rouge-score ") and "version:" in ev["provenance"]["chrf"]
    f = ev["forgetting"]
    assert f["prompts"] == 16 and f["versions"]["data_sha256"].startswith("67ffeee0")
    for k in ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose"):
        for model in ("base", "finetuned"):
            lo, hi = f["intervals"][k][model]
            assert 0 <= lo <= f["scores"][model][k] <= hi <= 1, (k, model)
        assert f["deltas"][k]["delta"] == pytest.approx(f["scores"]["finetuned"][k] - f["scores"]["base"][k])
    assert f["drop"] == pytest.approx(f["scores"]["base"]["prompt_loose"] - f["scores"]["finetuned"]["prompt_loose"])
    assert len(f["by_type"]) >= 10  # stratified: 16 prompts cover many instruction types
    # label-free drift: the JSON-only fine-tune finds the base model's own prose answers less likely
    d = f["drift"]
    assert d["finetuned_nll"] > d["base_nll"] > 0 and d["ppl_ratio"] == pytest.approx(
        np.exp(d["finetuned_nll"] - d["base_nll"])
    )
    assert ev["judge"] is None  # switched off in the shared run: tested in test_e2e_newcomer.py
    md = (quickstart_run["dir"] / "run_card.md").read_text()
    assert "### Forgetting: IFEval (16 prompts" in md and "| prompt-level loose |" in md and "Label-free drift" in md
    assert "### Judge" not in md
