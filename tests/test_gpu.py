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
    proc = subprocess.run([*FTX, "recipe", "run", str(RECIPE), f"output_dir={out}", "train.max_steps=4",
                           "train.eval_every=4", *overrides, "--until", "train"], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1]).parent
    return run_dir, json.loads((run_dir / "run_card.json").read_text())["train"]


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="the gpu extra (unsloth) is not installed")
def test_unsloth_backend_writes_a_standard_peft_adapter(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, tr = run_train(tmp_path, "train.method=qlora", "train.backend=unsloth")
    assert tr["backend"] == "unsloth" and tr["device"] == "cuda"
    base_dir = json.loads((run_dir / "manifest.json").read_text())["inputs"]["base_model"]["path"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    x = torch.tensor([tok("What is 12 + 30?")["input_ids"]])
    with torch.no_grad():
        before = base(input_ids=x).logits
        after = PeftModel.from_pretrained(base, run_dir / "adapter").eval()(input_ids=x).logits
    assert (after - before).abs().max() > 1e-3


def test_qlora_on_cuda_uses_bf16_and_a_paged_optimizer(tmp_path):
    _, tr = run_train(tmp_path, "train.method=qlora", "train.backend=hf")
    assert tr["device"] == "cuda" and tr["optimizer"] == "paged_adamw_8bit" and tr["backend"] == "hf"
    assert tr["val_loss"] < 3.0 and tr["peak_memory_mb"] > 0
