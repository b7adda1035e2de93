"""A wheel built from the repository and installed non-editable into a fresh virtual environment works away from the
checkout: its packaged resources (hardware profiles, API prices, Modelfile and run-card templates, the Go renderer's
source) are inside the wheel, and `ftx recipe validate` and `ftx modelfile` run from another directory."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(ftx executable, python) of a fresh venv holding only the ftx wheel; the heavy dependencies come from this
    environment's site-packages, added after the venv's own (so ftx itself is the wheel's)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp / "dist").glob("ftx-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=300)
    py = tmp / "venv" / "bin" / "python"
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "zz_ftx_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return tmp / "venv" / "bin" / "ftx", py, tmp


def test_the_wheel_carries_its_resources(installed):
    _, py, _ = installed
    code = (
        "import ftx, json; from ftx.core import resources; "
        "print(json.dumps([ftx.__file__, str(resources.path('api_prices.yaml')), "
        "sorted(resources.hardware_profiles()), str(resources.path('modelfiles', 'chatml.gotmpl')), "
        "str(resources.path('templates', 'card', 'export.md.j2')), str(resources.path('gotmpl', 'main.go')), "
        "str(resources.path('templates', 'ab.html.j2')), str(resources.path('mtbench', 'question.jsonl')), "
        "str(resources.path('ifeval', 'input_data.jsonl')), str(resources.path('ifeval', 'LICENSE')), "
        "str(resources.path('lmeval', 'ftx_quickstart_mc.yaml')), "
        "str(resources.path('lmeval', 'quickstart_heldout.jsonl'))]))"
    )
    out = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout)
    assert all("site-packages" in p and str(ROOT) not in p for p in out if isinstance(p, str)), out
    assert out[2] == ["cloud-2vcpu", "cloud-rtx4090", "rtx4090-workstation"]
    # the vendored eval data and checkers, and the packaged lm-eval tasks: a wheel install evaluates offline too
    code = "from ftx.metrics import ifeval; from ftx import judge; "
    code += "print(len(ifeval.load_prompts()), len(judge.questions()))"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout.split()
    assert out == ["541", "80"]


def test_recipe_validate_runs_from_the_installed_wheel(installed, tmp_path):
    ftx, _, _ = installed
    proc = subprocess.run(
        [str(ftx), "recipe", "validate", str(ROOT / "recipes" / "quickstart.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert "site-packages" in cfg["bench"]["hardware"] and cfg["bench"]["hardware"].endswith("cloud-2vcpu.yaml")


@pytest.mark.e2e
def test_modelfile_runs_from_the_installed_wheel(installed, quickstart_run, tmp_path):
    ftx, _, _ = installed
    (tmp_path / "ship").mkdir()
    (tmp_path / "ship" / "model.gguf").symlink_to(quickstart_run["dir"] / "model-q4_k_m.gguf")
    proc = subprocess.run(
        [
            str(ftx),
            "modelfile",
            "--model",
            str(quickstart_run["dir"] / "merged"),
            "--gguf",
            "ship/model.gguf",
            "--num-ctx",
            "512",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FROM ./model.gguf" in (tmp_path / "ship" / "Modelfile").read_text()
    assert json.loads((tmp_path / "ship" / "Modelfile.proof.json").read_text())["proven"]
