"""The recipe runner: iterates the stage registry through a content-addressed cache.

Each stage's output lives in <output_dir>/.cache/<stage>/<key>. Every key is derived the same way (ftx.stage),
so re-running a recipe re-runs nothing and changing one setting re-runs that stage and everything downstream.
A stage writes into a temp dir that is renamed into place when it returns, so an interrupted run leaves
nothing half-written and resumes at the first unfinished stage. Inputs are validated (`Stage.prepare`) before
any stage runs. Every run gets its own directory with manifest.json (lineage) and run_card.md/.json (ftx.card).
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .core.cache import atomic_dir, read_json, sha256_file, sha256_tree, stable_hash, write_json
from .core.config import inputs as config_inputs
from .core.config import key_dump
from .core.errors import FtxError
from .core.usage import track_usage
from .stage import Context, Stage, StageRun


class Runner:
    def __init__(
        self,
        stages: list[Stage],
        recipe,
        out_root: Path,
        force: set[str] = frozenset(),
        until: str | None = None,
        console=None,
    ):
        self.registry = {s.name: s for s in stages}
        self.recipe, self.out_root, self.console = recipe, Path(out_root), console
        self.cache = self.out_root / ".cache"
        names = list(self.registry)
        for s in (*force, *([until] if until else [])):
            if s not in names and s != "all":
                raise FtxError(f"unknown stage {s!r}; stages: {', '.join(names)}")
        enabled = [s for s in stages if not s.optional or getattr(recipe, s.name) is not None]
        if until:
            cut = names.index(until)
            enabled = [s for s in enabled if names.index(s.name) <= cut]
        self.stages = enabled
        order = [s.name for s in enabled]
        first_forced = min((order.index(s) for s in force if s in order), default=None)
        self.force = set(order) if "all" in force else set(order[first_forced:]) if first_forced is not None else set()
        self.runs: dict[str, StageRun] = {}
        self.prepared: dict[str, object] = {}
        self._hashes: dict[Path, str] = {}
        self._services: dict[str, object] = {}
        self._exit = contextlib.ExitStack()
        self._base_dir: Path | None = None
        self.inputs: dict[str, dict] = {}
        self.keys: dict[str, str] = {}

    # ---------------------------------------------------------------------------------------------- keys
    def resolve(self, need: str) -> str:
        """A stage name, or the last enabled stage that provides `need` (an adapter: dpo if enabled, else train)."""
        if need in self.registry:
            return need
        providers = [s.name for s in self.stages if s.provides == need]
        if not providers:
            raise FtxError(f"no enabled stage provides {need!r}")
        return providers[-1]

    def hash_path(self, path: Path) -> str:
        path = Path(path).resolve()
        if path not in self._hashes:
            self._hashes[path] = sha256_tree(path) if path.is_dir() else sha256_file(path)
        return self._hashes[path]

    def _key(self, stage: Stage) -> str:
        section = getattr(self.recipe, stage.name)
        reads = {}
        files = {f"{stage.name}.{k}": v for k, v in config_inputs(section).items()}
        for path in stage.reads:
            value = self.recipe
            for part in path.split("."):
                value = getattr(value, part)
            reads[path] = key_dump(value)
            if hasattr(value, "model_fields"):
                files.update({f"{path}.{k}": v for k, v in config_inputs(value).items()})
        files.update(stage.extra_inputs(Context(self, stage)))
        hashed = {k: self.hash_path(p) for k, p in files.items()}
        for k, p in files.items():
            self.inputs[k] = {"path": str(p), "sha256": hashed[k]}
        needs = {n: self.keys[self.resolve(n)] for n in stage.upstream(self.recipe)}
        return stable_hash(
            {
                "stage": stage.name,
                "ftx": __version__,
                "config": stage.key_config(section),
                "reads": reads,
                "needs": needs,
                "inputs": hashed,
                **({"revision": stage.revision} if stage.revision > 1 else {}),
            }
        )[:16]

    def cached(self, name: str) -> StageRun | None:
        done = self.cache / name / self.keys[name] / "stage.json"
        if done.exists() and name not in self.force:
            run = StageRun(**read_json(done))
            run.cached, run.dir = True, str(done.parent)
            return run
        return None

    # ---------------------------------------------------------------------------------------------- running
    def base_dir(self) -> Path:
        if self._base_dir is None:
            from .core import basemodel

            with self._status("preparing the base model ..."):
                self._base_dir = basemodel.resolve(self.recipe.base_model)
        return self._base_dir

    def _status(self, text: str):
        return self.console.status(text) if self.console else contextlib.nullcontext()

    def open_service(self, name: str):
        if name not in self._services:
            stage = self.registry[name]
            self._services[name] = self._exit.enter_context(stage.service(Context(self, stage)))
        return self._services[name]

    def plan(self) -> dict[str, str]:
        """Every stage's key, in order; each stage that will run validates its inputs (`prepare`) as soon as its
        key is known, so bad data fails before the base model is converted and before any stage runs."""
        for s in self.stages:
            self.keys[s.name] = self._key(s)
            if self.cached(s.name) is None:
                self.prepared[s.name] = s.prepare(Context(self, s))
        return self.keys

    def run(self, keep_services: bool = False) -> dict[str, StageRun]:
        """Run (or take from the cache) every enabled stage. Services are closed at the end, unless
        `keep_services` (then `close()` does it: `ftx recipe run --serve` keeps the endpoint up)."""
        self.plan()
        with contextlib.ExitStack() as guard:
            guard.callback(self.close)  # on failure always; on success unless the services are kept
            for s in self.stages:
                run = self.cached(s.name)
                if run is None:
                    for need in s.upstream(self.recipe):  # a live service an upstream stage offers
                        up = self.registry[self.resolve(need)]
                        if type(up).service is not Stage.service:
                            self.open_service(up.name)
                    run = self._execute(s)
                elif self.console:
                    self.console.print(f"[dim]{s.name}: cached ({run.key})[/]")
                self.runs[s.name] = run
            if keep_services:
                guard.pop_all()
        return self.runs

    def close(self) -> None:
        self._exit.close()
        self._services.clear()

    def _execute(self, stage: Stage) -> StageRun:
        if self.console:
            self.console.rule(f"[bold]{stage.name}")
        final = self.cache / stage.name / self.keys[stage.name]
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(final) as tmp:
            with track_usage() as usage:
                result = stage.run(Context(self, stage), tmp)
            run = StageRun(
                name=stage.name,
                key=self.keys[stage.name],
                dir=str(final),
                cached=False,
                wall_s=usage.wall_s,
                peak_rss_mb=usage.peak_rss_mb,
                result=json.loads(result.model_dump_json()),
            )
            write_json(tmp / "stage.json", run.model_dump())
        gc.collect()
        return run


def run_recipe(
    recipe_path: Path,
    overrides: tuple[str, ...] = (),
    force: tuple[str, ...] = (),
    until: str | None = None,
    console=None,
    serve: bool = False,
) -> Path:
    """Run a recipe; returns the run directory. `serve`: then keep the serve stage's endpoint up until Ctrl-C
    (it is started even when serve and bench were cached)."""
    from rich.console import Console

    from . import card, pipeline

    console = console or Console(stderr=True)
    doc = pipeline.load_doc(recipe_path, overrides)
    pipeline.check_output(doc)  # before any work: nothing is written when it cannot be
    recipe = doc.model
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    runner = Runner(pipeline.STAGES, recipe, recipe.output_dir.resolve(), set(force), until, console)
    if serve and "serve" not in {s.name for s in runner.stages}:
        raise FtxError("--serve keeps the serve stage's endpoint up: not with --until before serve")
    runner.inputs = {
        "recipe": {"path": str(Path(recipe_path).resolve()), "sha256": sha256_file(Path(recipe_path))},
        **runner.inputs,
    }
    try:
        runner.run(keep_services=serve)
        run_dir = card.write_run_dir(recipe, runner, list(overrides), started, time.perf_counter() - t0, console)
        if serve:
            import os

            from .serving import hold

            ep = runner.open_service("serve")
            hold(
                ep,
                ep.info.get("served", ""),
                ep.log,
                console,
                show_key=not (recipe.serve.api_key or os.environ.get("FTX_API_KEY")),
            )
    finally:
        runner.close()
    return run_dir


def _train_launch(recipe_path: Path, overrides: tuple[str, ...], console=None, device: str | None = None):
    """Run (or take from the cache) what the train stage needs and write its distributed job spec, without
    training: (recipe, the train stage's context, its launch directory, the job, every node's command).
    `device`: where the workers will run (default: this machine's), for the checks of what cannot work there."""
    from . import pipeline

    recipe = pipeline.load_doc(recipe_path, overrides).model
    if recipe.train.distributed is None:
        raise FtxError("train.distributed is not set: there is nothing to launch (e.g. train.distributed.nnodes=2)")
    runner = Runner(pipeline.STAGES, recipe, recipe.output_dir.resolve(), until="data", console=console)
    try:
        runner.run()
    finally:
        runner.close()
    train = runner.registry["train"]
    runner.keys[train.name] = runner._key(train)
    ctx = Context(runner, train)
    from .core import launch

    if device is None:
        from .core.models import pick_device

        device = pick_device()
    launch.check(recipe.train.distributed, recipe.train.method, device, recipe.train.batch_size)
    here, job, cmds = train.launch_plan(ctx)
    return recipe, ctx, here, job, cmds


def launch_commands(recipe_path: Path, overrides: tuple[str, ...] = (), console=None) -> list[str]:
    """`ftx train --print-launch`: every node's launch command."""
    from .core.launch import render

    return [render(c) for c in _train_launch(recipe_path, overrides, console)[4]]


def train_job(recipe_path: Path, overrides: tuple[str, ...], out: Path, console=None) -> str:
    """`ftx train --k8s-job OUT.yaml`: the validated Indexed Job + headless Service; returns what to do next."""
    from . import trainjob
    from .core.cache import atomic_write_text
    from .core.k8s import to_yaml, validate

    recipe, ctx, here, job, _ = _train_launch(recipe_path, overrides, console, device="cuda")  # GPU nodes
    dist = recipe.train.distributed
    k = dist.kubernetes
    docs = trainjob.manifests(dist, here, job, recipe.output_dir, k)
    validate(docs)
    atomic_write_text(Path(out), to_yaml(docs))
    return trainjob.instructions(out, recipe.output_dir, ctx.base_dir, k, dist.nnodes)
