import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
FTX = [sys.executable, "-m", "ftx.cli"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def recipe_copy(tmp_path):
    """The quickstart recipe and its data, copied to a temp dir so tests may edit them."""
    import shutil

    d = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", d, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    shutil.copytree(ROOT / "bench" / "hardware", tmp_path / "bench" / "hardware")  # the recipe's bench.hardware
    return d / "quickstart.yaml"


# ------------------------------------------------------------------ the quickstart pipeline, run once per session
STEPS = 20
BENCH_REQUESTS = 12


def ftx_cmd(out, *extra):
    return [*FTX, "recipe", "run", str(RECIPE), f"train.max_steps={STEPS}", "train.eval_every=10",
            f"bench.requests={BENCH_REQUESTS}", f"output_dir={out}", *extra]


def ftx_run(out, *extra):
    proc = subprocess.run(ftx_cmd(out, *extra), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1]).parent
    return run_dir, json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The quickstart recipe end to end (fewer steps), shared by the end-to-end test modules."""
    out = tmp_path_factory.mktemp("e2e") / "runs"
    run_dir, manifest = ftx_run(out)
    card = json.loads((run_dir / "run_card.json").read_text())
    return {"out": out, "dir": run_dir, "manifest": manifest, "card": card}
