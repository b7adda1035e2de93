"""GPU-only paths: the Unsloth backend and QLoRA with a paged optimizer on CUDA. They skip cleanly on machines
without CUDA (this project's CI); run them where a GPU is available (`pytest tests/test_gpu.py`)."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from .conftest import FTX, RECIPE


def cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda(), reason="needs CUDA (no GPU on this machine)")]


def run_train(tmp_path, *overrides):
    out = tmp_path / "runs"
    proc = subprocess.run(
        [
            *FTX,
            "recipe",
            "run",
            str(RECIPE),
            f"output_dir={out}",
            "train.max_steps=4",
            "train.eval_every=4",
            *overrides,
            "--until",
            "train",
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1]).parent
    return run_dir, json.loads((run_dir / "run_card.json").read_text())["train"]


def val_losses(run_dir) -> list[float]:
    """Validation losses logged during training; the first is the untrained model's (eval on start)."""
    rows = [json.loads(line) for line in (run_dir / "stages" / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="the gpu extra (unsloth) is not installed")
def test_unsloth_backend_writes_a_standard_peft_adapter(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftx.core.chat import read_examples
    from ftx.core.models import response_loss

    run_dir, tr = run_train(tmp_path, "train.method=qlora", "train.backend=unsloth")
    assert tr["backend"] == "unsloth" and tr["device"] == "cuda"
    vals = val_losses(run_dir)
    assert vals[-1] < 0.9 * vals[0], vals  # it learned: at least 10% below the untrained model's val loss
    # the saved adapter is plain peft: on the full-precision base it lowers the loss on the validation split too
    base_dir = json.loads((run_dir / "manifest.json").read_text())["inputs"]["base_model"]["path"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    val = read_examples(run_dir / "stages" / "data" / "val.jsonl")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run_dir / "adapter"
    ).eval()
    tuned = response_loss(model, tok, val, 512)
    with model.disable_adapter():
        untuned = response_loss(model, tok, val, 512)
    assert tuned < 0.9 * untuned, (tuned, untuned)


def test_qlora_on_cuda_uses_bf16_and_a_paged_optimizer(tmp_path):
    run_dir, tr = run_train(tmp_path, "train.method=qlora", "train.backend=hf")
    assert tr["device"] == "cuda" and tr["optimizer"] == "paged_adamw_8bit" and tr["backend"] == "hf"
    vals = val_losses(run_dir)
    assert vals[-1] < 0.9 * vals[0] and tr["peak_memory_mb"] > 0, vals  # learned, not just ran
