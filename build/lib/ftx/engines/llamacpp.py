"""llama.cpp's llama-server: a GGUF (+ GGUF LoRA adapters) with parallel slots and continuous batching.

Why llama-server and not `python -m llama_cpp.server`: llama_cpp.server serializes every request behind one
lock; llama-server gave 2.8-3.6x the aggregate throughput under concurrency on the same Q8_0 file on a 2-core
CPU (shared/notes). Both come from the same llama-cpp-python sdist; llama-server is built once at install time.
llama-server alone serves one alias and picks adapters by numeric id: the gateway (mode `rewrite`) turns each
adapter into a model name and sends explicit scales for every adapter id."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..core.adapters import check_gguf_lora
from ..core.gguf import check_gguf
from .base import Engine


class LlamaCppSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parallel: int = Field(4, ge=1, description="llama-server slots (concurrent sequences)")
    ctx_size: int = Field(4096, ge=256, description="total context, split across slots")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: llama-server's, all cores)")


class LlamaCpp(Engine):
    name, label = "llamacpp", "llama-server"
    settings = LlamaCppSettings
    serves, adapter_kind, gateway = "gguf", "file", "rewrite"
    startup_timeout_s = 180.0

    def check_adapters(self, adapters: dict[str, Path], model: Path) -> dict[str, Path]:
        check_gguf(model)
        return {n: check_gguf_lora(n, p, model) for n, p in adapters.items()}

    def command(
        self,
        settings: LlamaCppSettings,
        model: Path,
        name: str,
        adapters: dict[str, Path],
        host: str,
        port: int,
        key: str,
    ) -> list[str]:
        from ..core import llamacpp

        cmd = [
            str(llamacpp.tool("llama-server")),
            "-m",
            str(model),
            "--host",
            host,
            "--port",
            str(port),
            "-np",
            str(settings.parallel),
            "-c",
            str(settings.ctx_size),
            "--alias",
            name,
            "--metrics",
            "--api-key",
            key,
            "--no-webui",
        ]
        if settings.threads:
            cmd += ["-t", str(settings.threads)]
        for p in adapters.values():
            cmd += ["--lora", str(p)]
        if adapters:
            cmd += ["--lora-init-without-apply"]
        return cmd
