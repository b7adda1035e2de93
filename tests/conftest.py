import os
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
    return d / "quickstart.yaml"
