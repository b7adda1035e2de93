"""scripts/gpu_check.sh: the prepared GPU check. Its --dry-run runs the same code on CPU with a tiny model; on a
machine with CUDA the real check runs (skipped here)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args, env=None, timeout=600):
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def _check_result(r: dict, device: str) -> None:
    assert r["device"] == device and r["torch"] and r["packages"]["peft"]
    runs = {x["backend"]: x for x in r["runs"]}
    assert "hf-lora" in runs
    for x in runs.values():
        assert x["tokens_per_s"] > 0 and x["peak_memory_mb"] > 0 and x["planner_mb"] > 0
        assert x["planner_over_measured"] == pytest.approx(x["planner_mb"] / x["peak_memory_mb"])
        assert math.isfinite(x["loss_first"]) and math.isfinite(x["loss_last"]) and x["trainable_params"] > 0
    assert set(runs) | set(r["skipped"]) == {"hf-lora", "hf-qlora", "unsloth"}


def test_dry_run_measures_every_available_backend_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--dry-run", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["gpu"] is None
    _check_result(r, "cpu")
    assert {x["backend"] for x in r["runs"]} == {"hf-lora", "hf-qlora"}  # bitsandbytes 0.50 runs NF4 on CPU
    assert r["skipped"] == {"unsloth": "Unsloth needs a CUDA GPU"}
    assert "hf-lora" in proc.stdout and f"wrote {out}" in proc.stdout


def test_a_machine_without_the_packages_is_told_what_to_fetch(tmp_path):
    bare = tmp_path / "python"  # this Python without site-packages: no torch, transformers, peft
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S -I "$@"\n')
    bare.chmod(0o755)
    env = {**os.environ, "PYTHON": str(bare)}
    proc = _run("--dry-run", "--out", tmp_path / "x.json", env=env, timeout=60)
    assert proc.returncode == 2 and "missing packages: torch" in proc.stderr, proc.stderr
    assert "--wheels" in proc.stderr and not (tmp_path / "x.json").exists()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_gpu_check_on_cuda(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--out", out, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    _check_result(r, "cuda")
    assert r["gpu"] and r["elapsed_s"] < 480
