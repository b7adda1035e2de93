"""Recipe runner: one YAML file -> data -> train -> eval -> merge -> export -> serve -> bench -> run card.

The runner only wires stages. Each stage's output lives in a content-addressed cache directory
(<output_dir>/.cache/<stage>/<key>) whose key hashes the stage's config, the keys of the stages it reads
and the content of its input files, so re-running a recipe re-runs nothing and changing one setting
re-runs that stage and everything downstream. Stage outputs are written to a temp dir and renamed into
place, so an interrupted run leaves nothing half-written and resumes from the last finished stage.
Every run gets its own directory with manifest.json (lineage) and run_card.md/.json.
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import shutil
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .bench import BenchConfig
from .data import DataConfig
from .dpo import DpoConfig
from .errors import FtxError
from .eval import EvalConfig
from .export import ExportConfig
from .merge import MergeConfig
from .serve import ServeConfig
from .train import TrainConfig
from .util import atomic_dir, read_json, sha256_file, sha256_tree, stable_hash, track_usage, write_json

STAGES = ("data", "train", "dpo", "eval", "merge", "export", "serve", "bench")
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "llama_cpp_python", "gguf", "openai",
            "numpy", "pydantic")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base_model: str
    license: str | None = Field(None, description="SPDX id of the fine-tuned model (model card, GGUF); "
                                                  "default: the base model's, when ftx knows it")
    output_dir: Path = Path("runs")
    data: DataConfig
    train: TrainConfig = TrainConfig()
    dpo: DpoConfig | None = Field(None, description="preference tuning after SFT (trl DPOTrainer); off when absent")
    eval: EvalConfig = EvalConfig()
    merge: MergeConfig = MergeConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()
    bench: BenchConfig = BenchConfig()


# ---------------------------------------------------------------------------------------------- loading

def load(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Parse and validate a recipe; any problem is one FtxError naming file:line and the key path."""
    from . import config

    doc = config.load(path, Recipe, overrides, what="recipe file")
    recipe = doc.model
    # data files are relative to the recipe file
    sections = [(("data",), recipe.data)] + ([(("dpo", "data"), recipe.dpo.data)] if recipe.dpo else [])
    for section, cfg in sections:
        for key in ("path", "heldout"):
            setattr(cfg, key, doc.resolve_file((*section, key), getattr(cfg, key)))
    for i, a in enumerate(recipe.merge.combine.adapters if recipe.merge.combine else []):
        full = a.path if a.path.is_absolute() else (doc.path.parent / a.path).resolve()
        if not (full / "adapter_config.json").is_file():
            raise FtxError(f"merge.combine.adapters.{i}.path: not a peft adapter directory: {full}",
                           where=doc.where(("merge", "combine", "adapters", i, "path")))
        a.path = full
    sv = recipe.serve
    sv.adapters = {n: doc.resolve_file(("serve", "adapters", n), a, "dir" if sv.engine == "vllm" else "file")
                   for n, a in sv.adapters.items()}
    b = recipe.bench
    b.hardware = doc.resolve_file(("bench", "hardware"), b.hardware)
    b.api_prices = doc.resolve_file(("bench", "api_prices"), b.api_prices)
    b.prompts.path = doc.resolve_file(("bench", "prompts", "path"), b.prompts.path)
    return recipe


# ---------------------------------------------------------------------------------------------- lineage

def package_versions() -> dict[str, str | None]:
    out = {"ftx": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": head.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def redacted(recipe: Recipe) -> dict:
    cfg = json.loads(recipe.model_dump_json())
    if cfg["serve"].get("api_key"):
        cfg["serve"]["api_key"] = "***"
    return cfg


# ---------------------------------------------------------------------------------------------- running

class StageRun(BaseModel):
    name: str
    key: str
    dir: str
    cached: bool
    wall_s: float = Field(description="time of the computation (the original run when cached)")
    peak_rss_mb: float
    result: dict


class Runner:
    """Runs stages through the content-addressed cache and records what happened."""

    def __init__(self, cache: Path, force: set[str], console):
        self.cache, self.force, self.console = cache, force, console
        self.runs: dict[str, StageRun] = {}

    def key(self, name: str, config: Any, deps: list[str]) -> str:
        return stable_hash({"stage": name, "ftx": __version__, "config": config, "deps": deps})[:16]

    def cached(self, name: str, key: str) -> StageRun | None:
        done = self.cache / name / key / "stage.json"
        if done.exists() and name not in self.force:
            run = StageRun(**read_json(done))
            run.cached, run.dir = True, str(done.parent)
            return run
        return None

    def run(self, name: str, key: str, fn: Callable[[Path], BaseModel]) -> StageRun:
        run = self.cached(name, key)
        if run is None:
            self.console.rule(f"[bold]{name}")
            final = self.cache / name / key
            with atomic_dir(final) as tmp:
                with track_usage() as usage:
                    result = fn(tmp)
                run = StageRun(name=name, key=key, dir=str(final), cached=False, wall_s=usage.wall_s,
                               peak_rss_mb=usage.peak_rss_mb, result=json.loads(result.model_dump_json()))
                write_json(tmp / "stage.json", run.model_dump())
            gc.collect()
        else:
            self.console.print(f"[dim]{name}: cached ({run.key})[/]")
        self.runs[name] = run
        return run

    def path(self, name: str, rel: str) -> Path:
        return Path(self.runs[name].dir) / rel


def forced_stages(force) -> set[str]:
    """Forcing a stage re-runs everything downstream of it too."""
    if not force:
        return set()
    if "all" in force:
        return set(STAGES)
    return set(STAGES[min(STAGES.index(s) for s in force):])


def run(recipe_path: Path, overrides: tuple[str, ...] = (), force: tuple[str, ...] = (), until: str = "bench",
        console=None) -> Path:
    """Run a recipe; returns the run directory."""
    from rich.console import Console

    from . import basemodel, bench, data, dpo, eval, export, merge, serve, train

    console = console or Console()
    for s in (*force, until):
        if s not in STAGES and s != "all":
            raise FtxError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
    recipe = load(recipe_path, overrides)
    force_set = forced_stages(force)
    stop_at = STAGES.index(until)
    out_root = recipe.output_dir.resolve()
    runner = Runner(out_root / ".cache", force_set, console)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()

    inputs = {
        "recipe": {"path": str(Path(recipe_path).resolve()), "sha256": sha256_file(Path(recipe_path))},
        "data": {"path": str(recipe.data.path), "sha256": sha256_file(recipe.data.path)},
        "heldout": ({"path": str(recipe.data.heldout), "sha256": sha256_file(recipe.data.heldout)}
                    if recipe.data.heldout else None),
    }
    data_cfg = {**recipe.data.model_dump(mode="json"), "path": inputs["data"]["sha256"],
                "heldout": inputs["heldout"] and inputs["heldout"]["sha256"]}

    k = {}
    k["data"] = runner.key("data", data_cfg, [])
    if recipe.dpo:
        inputs["dpo_data"] = {"path": str(recipe.dpo.data.path), "sha256": sha256_file(recipe.dpo.data.path)}
    if runner.cached("data", k["data"]) is None:
        prepared = data.prepare(recipe.data)  # bad data fails before anything is printed or written
    if recipe.dpo and stop_at >= STAGES.index("dpo"):
        pairs, _ = data.prepare(recipe.dpo.data)  # likewise the preference pairs: not after hours of SFT
    runner.run("data", k["data"], lambda out: data.write(*prepared, out))
    with console.status("preparing the base model ..."):
        base_dir = basemodel.resolve(recipe.base_model)
        inputs["base_model"] = {"name": recipe.base_model, "path": str(base_dir), "sha256": sha256_tree(base_dir)}
    d = runner.runs["data"].result
    train_file, val_file = runner.path("data", d["train_file"]), runner.path("data", d["val_file"])
    heldout_file = runner.path("data", d["heldout_file"]) if d["heldout_file"] else val_file
    msl = recipe.data.max_seq_len

    if stop_at >= STAGES.index("train"):
        k["train"] = runner.key("train", recipe.train.model_dump(mode="json"), [k["data"], inputs["base_model"]["sha256"]])
        # checkpoints are keyed like the stage and live outside its temp dir: a crashed run resumes from them
        ckpt = runner.cache / "train" / f"{k['train']}.checkpoints"
        runner.run("train", k["train"], lambda out: train.run(recipe.train, base_dir, train_file, val_file, msl, out, ckpt,
                                                              log_root=out_root, run_name=f"{recipe.name}/{k['train']}"))
        shutil.rmtree(ckpt, ignore_errors=True)
        adapter = runner.path("train", runner.runs["train"].result["adapter_dir"])
        k["adapter"] = k["train"]  # the stage whose adapter downstream stages use
    if recipe.dpo and stop_at >= STAGES.index("dpo"):
        dpo_cfg = {**recipe.dpo.model_dump(mode="json"), "data": {**recipe.dpo.data.model_dump(mode="json"),
                                                                   "path": inputs["dpo_data"]["sha256"], "heldout": None}}
        k["dpo"] = runner.key("dpo", dpo_cfg, [k["train"]])
        runner.run("dpo", k["dpo"], lambda out: dpo.run(recipe.dpo, base_dir, adapter, pairs, msl, out, recipe.train.method))
        adapter = runner.path("dpo", runner.runs["dpo"].result["adapter_dir"])
        k["adapter"] = k["dpo"]
    if stop_at >= STAGES.index("eval"):
        k["eval"] = runner.key("eval", recipe.eval.model_dump(mode="json"), [k["adapter"]])
        runner.run("eval", k["eval"], lambda out: eval.run(recipe.eval, base_dir, adapter, val_file, heldout_file, msl))
    if stop_at >= STAGES.index("merge"):
        license = recipe.license or basemodel.LICENSES.get(recipe.base_model)
        merge_cfg = {**recipe.merge.model_dump(mode="json"), "license": license, "method": recipe.train.method,
                     "combined": [sha256_tree(a.path) for a in recipe.merge.combine.adapters] if recipe.merge.combine else []}
        k["merge"] = runner.key("merge", merge_cfg, [k["adapter"]])
        runner.run("merge", k["merge"], lambda out: merge.run(recipe.merge, base_dir, adapter, val_file, out,
                                                              recipe.name, recipe.base_model, license,
                                                              recipe.train.method))
        merged = runner.path("merge", runner.runs["merge"].result["merged_dir"])
    if stop_at >= STAGES.index("export"):
        export_cfg = {**recipe.export.model_dump(mode="json"), "name": recipe.name, "num_ctx": msl}
        k["export"] = runner.key("export", export_cfg, [k["merge"]])
        held_for_gate = runner.path("data", d["heldout_file"]) if d["heldout_file"] else None
        runner.run("export", k["export"], lambda out: export.run(recipe.export, merged, val_file, recipe.name, msl, out,
                                                                  held_for_gate, k["export"], recipe.base_model,
                                                                  base_dir, adapter, train_file))
    if stop_at >= STAGES.index("serve"):
        sv = recipe.serve
        if sv.engine == "llamacpp":
            files = {f["name"]: f["file"] for f in runner.runs["export"].result["files"]}
            quant = runner.runs["export"].result["selected"] if sv.quant == "auto" else sv.quant
            if quant not in files:
                raise FtxError(f"serve.quant {quant!r} is not among the exported files ({', '.join(files)})")
            gguf = runner.path("export", files[quant])
            served_from = [k["export"]]
        else:  # vLLM serves the unmerged adapter on the base model: what it is for (many adapters, one base)
            gguf, served_from = None, [k["adapter"]]
        other_engine = {"vllm"} if sv.engine == "llamacpp" else {"quant", *serve.LlamaServerEngine.model_fields}
        serve_cfg = {**sv.model_dump(mode="json", exclude={"api_key", "port", "startup_timeout_s", *other_engine}),
                     "regex": recipe.eval.response_regex, "max_new_tokens": recipe.eval.max_new_tokens,
                     "adapter_files": {n: sha256_tree(a) if a.is_dir() else sha256_file(a) for n, a in sv.adapters.items()}}
        k["serve"] = runner.key("serve", serve_cfg, [*served_from, k["data"]])
        bench_files = [sha256_file(f) for f in (recipe.bench.hardware, recipe.bench.api_prices, recipe.bench.prompts.path) if f]
        k["bench"] = runner.key("bench", {**recipe.bench.model_dump(mode="json"), "files": bench_files}, [k["serve"]])
        held = data.read_split(heldout_file)
        need = list(("serve", "bench")[: stop_at - STAGES.index("serve") + 1])
        missing = [s for s in need if runner.cached(s, k[s]) is None]
        if missing:
            server_log = out_root / ".cache" / "serve" / f"{k['serve']}.server.log"
            with contextlib.ExitStack() as server:
                with console.status(f"starting {'llama-server with ' + gguf.name if gguf else 'vLLM (multi-LoRA)'} ..."):
                    t_start = time.perf_counter()
                    endpoint, result = server.enter_context(
                        serve.for_recipe(sv, recipe.name, gguf, base_dir, recipe.base_model, adapter, server_log))
                    startup = time.perf_counter() - t_start

                def do_serve(out: Path) -> serve.ServeResult:
                    chk = serve.check(endpoint, held[: sv.check_prompts], recipe.eval.response_regex,
                                      recipe.eval.max_new_tokens)
                    return serve.ServeResult(**result, startup_s=startup, **chk)

                runner.run("serve", k["serve"], do_serve)
                if "bench" in need:
                    from .bench.prompts import load_tokenizer

                    tok = load_tokenizer(recipe.bench.prompts.tokenizer or str(base_dir))
                    prompts = bench.load_prompts(recipe.bench, held, tok)
                    target = bench.Target(recipe.name, endpoint.base_url, endpoint.api_key, [endpoint.model])
                    runner.run("bench", k["bench"], lambda out: bench.run(recipe.bench, [target], prompts, out, tok))
        else:
            for s in need:
                runner.run(s, k[s], None)  # cached: fn is never called

    total = time.perf_counter() - t0
    from .card import write_run_dir

    return write_run_dir(recipe, runner, inputs, redacted(recipe), list(overrides), started, total,
                         package_versions(), git_commit(), console)
