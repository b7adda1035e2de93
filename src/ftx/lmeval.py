"""`ftx eval lm-eval`: EleutherAI's lm-evaluation-harness (`lm_eval.simple_evaluate`) on a model in-process (its
`hf` model: an HF directory or an ftx base model name, CPU, fp32, optionally a peft adapter) or on a served
OpenAI-compatible chat endpoint (its `local-chat-completions` model: llama-server, vLLM, an `ftx serve` gateway).

Tasks are lm-eval task names or task YAML files. ftx ships tasks built from its own data in `ftx/resources/lmeval/`
(`ftx_quickstart_gen`, `ftx_quickstart_mc`; see the README there): local JSONL through `dataset_path: json` and
`dataset_kwargs.data_files`, a path relative to the YAML file that is made absolute here (lm-eval would resolve it
against the working directory). Nothing is downloaded: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set, so an
lm-eval built-in task runs only when its dataset is already in the local Hugging Face cache.

A chat endpoint gives no prompt log-probabilities, so log-likelihood tasks (`multiple_choice`, `loglikelihood`,
`loglikelihood_rolling`) are refused for an endpoint before any request is sent; they run in-process.

lm-eval and its dependencies are imported inside the functions: `import lm_eval.tasks` alone loads datasets,
scikit-learn and more, and `ftx --help` must stay light."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .core.cache import atomic_write_text, sha256_file
from .core.config import OutputDir
from .core.errors import FtxError

LOGLIKELIHOOD_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
LOCAL_DATASETS = ("json", "csv", "parquet", "text", "arrow")  # datasets' packaged builders: data_files, no hub


class LmEvalJob(BaseModel):
    """`ftx eval lm-eval`: lm-evaluation-harness tasks on a model in-process or on a served endpoint."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(
        min_length=1, description="lm-eval task names or task YAML files (ftx ships ftx_quickstart_gen, _mc)"
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="an HF directory or an ftx base model name (in-process), or the model name at the endpoint",
    )
    adapter: str | None = Field(None, description="a peft adapter directory over the model (in-process)")
    endpoint: str | None = Field(None, description="an OpenAI-compatible base URL (generation tasks only)")
    limit: int | None = Field(None, ge=1, description="the first N documents of each task")
    batch_size: int = Field(8, ge=1, description="sequences per batch in-process, concurrent requests on an endpoint")
    out: OutputDir = Field(OutputDir("lm-eval.json"), description="the results JSON (+ .samples.jsonl beside it)")


def task_dir() -> Path:
    """The folder of ftx's packaged lm-eval tasks (YAML + JSONL)."""
    from .core.resources import folder

    return folder("lmeval")


def packaged_tasks() -> dict[str, Path]:
    """ftx's packaged task names and their YAML files."""
    import yaml

    out = {}
    for p in sorted(task_dir().glob("*.yaml")):
        name = (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("task")
        if isinstance(name, str):
            out[name] = p
    return out


def _offline() -> None:
    """ftx never downloads: the hub and datasets offline, also when they were imported before this call."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        cfg = sys.modules["datasets.config"]
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or Path(spec).expanduser().is_file()


def _absolute_data_files(cfg: dict, yaml_path: Path) -> list[Path]:
    """Make the local data files of a task config absolute against its YAML file's folder (where they exist there);
    return the local data files."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is None or cfg.get("dataset_path") not in LOCAL_DATASETS:
        return []

    def fix(f):
        if isinstance(f, list):
            return [fix(x) for x in f]
        p = Path(str(f)).expanduser()
        return str(p if p.is_absolute() or not (yaml_path.parent / p).exists() else (yaml_path.parent / p).resolve())

    kwargs["data_files"] = {k: fix(v) for k, v in files.items()} if isinstance(files, dict) else fix(files)
    cfg["dataset_kwargs"] = kwargs
    found = kwargs["data_files"].values() if isinstance(kwargs["data_files"], dict) else [kwargs["data_files"]]
    flat = [x for v in found for x in (v if isinstance(v, list) else [v])]
    missing = [x for x in flat if not Path(x).is_file()]
    if missing:
        raise FtxError(f"task {cfg.get('task')!r}: data file not found: {missing[0]}", where=str(yaml_path))
    return [Path(x) for x in flat]


def load_tasks(tasks: list[str]) -> tuple[Any, dict, dict]:
    """Resolve task names and YAML files to lm-eval objects: (TaskManager, loaded {tasks, groups, group_map},
    {task name: {yaml, data: {file: sha256}}}). ftx's packaged tasks come first; lm-eval's own are indexed only
    when a name is not found there."""
    if not tasks:
        raise FtxError("no lm-eval task given (packaged: " + ", ".join(packaged_tasks()) + ")")
    _offline()
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    files = [Path(t).expanduser().resolve() for t in tasks if _is_yaml(t)]
    for f in files:
        if not f.is_file():
            raise FtxError(f"task file not found: {f}")
    include = list(dict.fromkeys([str(task_dir())] + sorted(str(f.parent) for f in files)))
    tm = TaskManager(include_path=include, include_defaults=False)
    names = [t for t in tasks if not _is_yaml(t)]
    if any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=include, include_defaults=True)
        unknown = [n for n in names if n not in tm.all_tasks]
        if unknown:
            raise FtxError(
                f"unknown lm-eval task {unknown[0]!r}: ftx's tasks are {', '.join(packaged_tasks())}; "
                "or give a task YAML file, or an lm-eval task name"
            )
    specs: list = []
    sources: dict[str, dict] = {}
    for t in tasks:
        path = Path(t).expanduser().resolve() if _is_yaml(t) else tm.task_index[t].yaml_path
        cfg = load_yaml(path, resolve_func=True) if path is not None else None
        if cfg is None or "task" not in cfg or isinstance(cfg.get("task"), list):  # a group, a tag, a Python task
            specs.append(str(path) if _is_yaml(t) else t)
            continue
        data = _absolute_data_files(cfg, Path(path))
        sources[cfg["task"]] = {"yaml": str(path), "data": {str(d): sha256_file(d) for d in data}}
        specs.append(cfg)
    return tm, tm.load(specs), sources


def _top(loaded: dict) -> list:
    """The loaded groups and tasks that are no group's members, for simple_evaluate."""
    members = {c for kids in loaded["group_map"].values() for c in kids}
    return [g for n, g in loaded["groups"].items() if n not in members] + [
        t for n, t in loaded["tasks"].items() if n not in members
    ]


def output_types(loaded: dict) -> dict[str, str]:
    return {name: (task.get_config("output_type") or task.OUTPUT_TYPE) for name, task in loaded["tasks"].items()}


def check_endpoint_tasks(types: dict[str, str]) -> None:
    """A chat endpoint generates text but gives no prompt log-probabilities: refuse log-likelihood tasks."""
    bad = {n: t for n, t in types.items() if t in LOGLIKELIHOOD_TYPES}
    if bad:
        listed = ", ".join(f"{n} ({t})" for n, t in bad.items())
        raise FtxError(
            f"{listed}: a log-likelihood task needs prompt log-probabilities, which a chat endpoint does not give "
            "(llama-server's /v1/chat/completions); run it in-process (a model directory, not an endpoint) or choose "
            "generate_until tasks"
        )


def chat_url(endpoint: str) -> str:
    """lm-eval's local-chat-completions posts to the full URL: .../v1/chat/completions."""
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def _number(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _plain(obj):
    """JSON-safe copy (numpy scalars, tuples, callables in lm-eval's configs)."""
    return json.loads(json.dumps(obj, default=str))


def _model(model, adapter, endpoint, model_name, api_key, batch_size) -> tuple[Any, dict, bool]:
    """(lm-eval LM, the config to record (no key), apply_chat_template)."""
    import lm_eval.api.registry

    if endpoint is not None:
        key = api_key or os.environ.get("FTX_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""
        args = {
            "model": model_name or str(model),
            "base_url": chat_url(endpoint),
            "tokenizer_backend": None,  # chat requests go as messages; the server tokenizes and applies its template
            "num_concurrent": batch_size,
            "max_retries": 3,
        }
        lm = lm_eval.api.registry.get_model("local-chat-completions").create_from_arg_obj(
            {**args, "header": {"Authorization": f"Bearer {key}"}}, {"batch_size": 1}
        )
        return lm, {"type": "local-chat-completions", "model_args": args, "api_key": bool(key)}, True

    from .core.adapters import check_peft_dir
    from .core.basemodel import resolve

    directory = resolve(str(model))
    args = {"pretrained": str(directory), "dtype": "float32", "device": "cpu"}
    if adapter is not None:
        args["peft"] = str(check_peft_dir("adapter", adapter, directory))
    lm = lm_eval.api.registry.get_model("hf").create_from_arg_obj(args, {"batch_size": batch_size})
    has_template = bool(getattr(lm.tokenizer, "chat_template", None))
    return lm, {"type": "hf", "model_args": args}, has_template


def run(
    tasks: list[str],
    model: str | Path,
    adapter: Path | None = None,
    endpoint: str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    out: Path | None = None,
) -> dict:
    """Evaluate `model` on lm-eval `tasks` (names or YAML files).

    In-process: `model` is an HF directory or an ftx base model name (`adapter`: a peft directory); lm-eval's `hf`
    model on CPU in fp32, `batch_size` sequences at a time, the tokenizer's chat template applied when it has one.
    Endpoint: `endpoint` is the OpenAI-compatible base URL (http://host:port/v1), `model_name` (default `model`) the
    model name it serves, `api_key` (default $FTX_API_KEY, else $OPENAI_API_KEY) its key; `batch_size` concurrent
    requests; generation tasks only. `limit`: the first N documents of each task.

    Returns {lm_eval, tasks: {name: {output_type, n, metrics: {metric,filter: {value, stderr}}, higher_is_better}},
    config, wall_s}; `out`: that as JSON (written whole or not at all) and the per-document samples next to it
    (`<out stem>.samples.jsonl`)."""
    if batch_size < 1:
        raise FtxError(f"batch_size must be at least 1 (got {batch_size})")
    if limit is not None and limit < 1:
        raise FtxError(f"limit must be at least 1 (got {limit})")
    if endpoint is not None and adapter is not None:
        raise FtxError("an endpoint serves its adapters as model names (model_name=...); adapter is for in-process")
    t0 = time.perf_counter()
    _offline()
    import lm_eval

    tm, loaded, sources = load_tasks(list(tasks))
    types = output_types(loaded)
    if endpoint is not None:
        check_endpoint_tasks(types)
    t_tasks = time.perf_counter()
    lm, model_cfg, chat = _model(model, adapter, endpoint, model_name, api_key, batch_size)
    t_model = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=_top(loaded),
        task_manager=tm,
        limit=limit,
        batch_size=batch_size,
        apply_chat_template=chat,
        log_samples=out is not None,
    )
    t_eval = time.perf_counter()
    config = {
        "model": str(model),
        "adapter": str(adapter) if adapter is not None else None,
        "endpoint": endpoint,
        **model_cfg,
        "tasks": list(tasks),
        "task_sources": sources,
        "task_configs": _plain(res.get("configs", {})),
        "limit": limit,
        "batch_size": batch_size,
        "apply_chat_template": chat,
        "chat_template": _template(lm, chat, endpoint is not None),
        "num_fewshot": {n: c.get("num_fewshot") for n, c in res.get("configs", {}).items()},
        "seeds": {k: res["config"].get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
        "bootstrap_iters": res["config"].get("bootstrap_iters"),
        "offline": True,
        "versions": _versions(),
    }
    summary = {
        "lm_eval": lm_eval.__version__,
        "tasks": {name: _task_result(name, res, types) for name in res["results"]},
        "config": config,
        "wall_s": {
            "tasks": round(t_tasks - t0, 2),
            "model": round(t_model - t_tasks, 2),
            "evaluate": round(t_eval - t_model, 2),
            "total": round(t_eval - t0, 2),
        },
    }
    if out is not None:
        out = Path(out)
        samples = out.with_name(out.stem + ".samples.jsonl")
        rows = [{"task": n, **s} for n, ss in (res.get("samples") or {}).items() for s in ss]
        atomic_write_text(samples, "".join(json.dumps(r, default=str) + "\n" for r in rows))
        atomic_write_text(out, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _task_result(name: str, res: dict, types: dict) -> dict:
    """One task's (or group's) metrics: {metric,filter: {value, stderr}}, stderr None where lm-eval has none."""
    raw = res["results"][name]
    metrics = {}
    for k, v in raw.items():
        if k in ("alias", "sample_len") or "_stderr," in k or k.endswith("_stderr"):
            continue
        metric, _, flt = k.partition(",")
        value = _number(v)
        if value is None:
            continue
        stderr = raw.get(f"{metric}_stderr,{flt}" if flt else f"{metric}_stderr")
        metrics[k] = {"value": value, "stderr": _number(stderr)}
    n = res.get("n-samples", {}).get(name, {})
    return {
        "output_type": types.get(name, "group"),
        "n": n.get("effective"),
        "n_documents": n.get("original"),
        "version": res.get("versions", {}).get(name),
        "higher_is_better": res.get("higher_is_better", {}).get(name, {}),
        "metrics": metrics,
    }


def _template(lm, chat: bool, served: bool) -> dict | None:
    """Which chat template shaped the prompts: the endpoint's own (the server renders the messages), or the
    tokenizer's (its sha256)."""
    if not chat:
        return None
    if served:
        return {"applied_by": "server"}
    import hashlib

    text = lm.chat_template(True) or ""
    return {"applied_by": "tokenizer", "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("lm_eval", "torch", "transformers", "peft", "datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out
