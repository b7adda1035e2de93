"""Shared fixtures. The end-to-end tests (marked e2e; `make test` runs them, plain `pytest` does not) share one
quickstart pipeline run, one QLoRA run and one vLLM server per test session; every other e2e run starts from
the quickstart run's cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
FTX = [sys.executable, "-m", "ftx.cli"]
REGEX = r'\{"category": "(math|geography|language|units)", "answer": "[^"]*"\}'  # the quickstart's trained format

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite keeps both cores busy with several processes at once (the background quickstart run trains while the
# unit tier runs; a client and a server in the e2e tier). OpenMP threads that spin while they wait (libgomp's
# default, in torch and in llama.cpp) then burn the CPU the other process needs: on this 2-core machine, a
# training step next to one busy process took 17.6 s spinning and 10.3 s passive (7.2-7.7 s alone either way),
# llama.cpp scoring 13.1 s vs 9.6 s. Alone, passive costs llama.cpp 13-25%, so ftx itself leaves the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def recipe_copy(tmp_path):
    """The shipped recipes and their data, copied to a temp dir so tests may edit them."""
    import shutil

    d = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", d, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return d / "quickstart.yaml"


# ------------------------------------------------------------------ the quickstart pipeline, run once per session
STEPS = 20
BENCH_REQUESTS = 8
# the quickstart with fewer steps, bench requests, quality-gate tokens and IFEval prompts and no judge (45 s here):
# the same pipeline, in less time
SETTINGS = [
    f"train.max_steps={STEPS}",
    "train.eval_every=10",
    f"bench.requests={BENCH_REQUESTS}",
    "export.eval_tokens=2048",
    "export.termination.prompts=8",
    "eval.forgetting.prompts=16",
    "eval.forgetting.max_new_tokens=64",
    "eval.judge=null",  # the eval stage's judge: tests/test_e2e_newcomer.py (4 pairs); judge.py: `ftx eval ab`
]


# distributed training in the e2e tests: DDP with 2 CPU workers through torchrun (tests/test_e2e_distributed.py);
# the DPO test uses the same setting so that its SFT run is that test's, from the cache
DDP = "train.distributed={launcher: torchrun, nproc_per_node: 2}"


def ftx_cmd(out, *extra):
    return [*FTX, "recipe", "run", str(RECIPE), *SETTINGS, f"output_dir={out}", *extra]


def ftx_run(out, *extra):
    proc = subprocess.run(ftx_cmd(out, *extra), capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1]).parent
    return run_dir, json.loads((run_dir / "manifest.json").read_text())


_background = {}  # the shared quickstart run, started at collection when the session has e2e tests


def pytest_collection_modifyitems(items):
    """The unit tier first, then the end-to-end tests (each group in file order): the shared quickstart run
    works in the background while the unit tests run, so its 5 minutes overlap theirs."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


def pytest_collection_finish(session):
    e2e = any(item.get_closest_marker("e2e") for item in session.items)
    if not e2e or session.config.option.collectonly or os.environ.get("FTX_TEST_NO_BACKGROUND"):
        return
    _background.update(_start(session.config._tmp_path_factory))


def _start(tmp_path_factory) -> dict:
    """The quickstart run as a child process, its stdout and stderr in files (not a terminal, as in CI)."""
    out = tmp_path_factory.mktemp("e2e") / "runs"
    log, err = out.parent / "quickstart.log", out.parent / "quickstart.err"
    with open(log, "w") as so, open(err, "w") as se:  # the child keeps its own copies of the descriptors
        proc = subprocess.Popen(ftx_cmd(out), stdout=so, stderr=se)
    return {"out": out, "proc": proc, "log": log, "err": err}


def pytest_sessionfinish(session):
    proc = _background.get("proc")
    if proc is not None and proc.poll() is None:  # interrupted before the e2e tier: stop the pipeline
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The quickstart recipe end to end through the CLI (fewer steps): every e2e module starts from it. Started
    at collection (see pytest_collection_finish) when possible, else here."""
    run = _background or _start(tmp_path_factory)
    returncode = run["proc"].wait(timeout=2400)
    stderr = run["err"].read_text()
    assert returncode == 0, stderr[-4000:]
    run_dir = Path(run["log"].read_text().strip().splitlines()[-1]).parent
    manifest = json.loads((run_dir / "manifest.json").read_text())
    card = json.loads((run_dir / "run_card.json").read_text())
    return {"out": run["out"], "dir": run_dir, "manifest": manifest, "card": card, "stderr": stderr}


@pytest.fixture(scope="session")
def base_dir(quickstart_run):
    return Path(quickstart_run["manifest"]["inputs"]["base_model"]["path"])


@pytest.fixture(scope="session")
def heldout(quickstart_run):
    from ftx.core.chat import read_split

    return read_split(quickstart_run["dir"] / "stages" / "data" / "heldout.jsonl")


@pytest.fixture(scope="session")
def hf(quickstart_run, base_dir):
    """tokenizer, base+adapter (peft) and the merged model, fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, quickstart_run["dir"] / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(quickstart_run["dir"] / "merged", dtype=torch.float32).eval()
    return tok, peft_model, merged


@pytest.fixture(scope="session")
def qlora_run(quickstart_run):
    """QLoRA, with the other training options switched on in the same short run: packing, the attention-only
    preset, gradient checkpointing, TensorBoard and MLflow logging."""
    return ftx_run(
        quickstart_run["out"],
        "train.method=qlora",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.packing=true",
        "train.lora.target_modules=attention",
        "train.gradient_checkpointing=true",
        "train.report_to=[tensorboard,mlflow]",
        "--until",
        "train",
    )


@pytest.fixture(scope="session")
def vllm_recipe(quickstart_run, qlora_run):
    """The one vLLM server of the test session: the quickstart recipe with serve.engine=vllm, run in this process
    with the endpoint kept up afterwards (as `ftx recipe run --serve` does). vLLM serves the base model with the
    recipe's adapter unmerged as `quickstart` and the QLoRA adapter as `qlora`; everything upstream of serve
    comes from the quickstart run's cache."""
    import io

    from rich.console import Console

    from ftx import card, pipeline
    from ftx.runner import Runner

    overrides = [
        *SETTINGS,
        f"output_dir={quickstart_run['out']}",
        "serve.engine=vllm",
        f"serve.adapters={{qlora: {qlora_run[0] / 'adapter'}}}",
        "serve.check_prompts=4",
        "bench.sweep=[2]",
        "bench.requests=4",
        "bench.warmup=1",
    ]
    recipe = pipeline.load(RECIPE, overrides)
    console = Console(file=io.StringIO())
    runner = Runner(pipeline.STAGES, recipe, recipe.output_dir, console=console)
    from datetime import datetime, timezone

    started = datetime.now(timezone.utc)
    try:
        runner.run(keep_services=True)
        run_dir = card.write_run_dir(recipe, runner, overrides, started, 0.0, console)
        yield {
            "runner": runner,
            "dir": run_dir,
            "endpoint": runner.open_service("serve"),
            "manifest": json.loads((run_dir / "manifest.json").read_text()),
            "card": json.loads((run_dir / "run_card.json").read_text()),
            "qlora": qlora_run[0] / "adapter",
        }
    finally:
        runner.close()
