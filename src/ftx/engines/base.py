"""The engine seam: what a serving engine declares. An engine is one module in ftx/engines/ with a subclass of
`Engine` and one line in ftx/engines/__init__.py; its settings become the `<name>:` section of serve configs and
of the recipe's `serve:` section, and one supervisor (ftx.serving) starts any engine behind ftx's gateway."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel


class Engine:
    name: ClassVar[str]
    label: ClassVar[str]  # for messages: "llama-server", "vLLM"
    settings: ClassVar[type[BaseModel]]
    serves: ClassVar[Literal["gguf", "hf"]]  # a GGUF file, or an HF model directory with peft adapters
    adapter_kind: ClassVar[Literal["file", "dir"]]  # a GGUF LoRA file, or a peft adapter directory
    startup_timeout_s: ClassVar[float]  # default time allowed to load the model
    gateway: ClassVar[Literal["rewrite", "passthrough"]]  # rewrite: the gateway maps model names to adapters

    def check_adapters(self, adapters: dict[str, Path], model: Path) -> dict[str, Path]:
        """Validate names and files against the model before the engine sees them; returns resolved paths."""
        raise NotImplementedError

    def command(
        self, settings, model: Path, name: str, adapters: dict[str, Path], host: str, port: int, key: str
    ) -> list[str]:
        raise NotImplementedError

    def env(self, settings) -> dict[str, str] | None:
        """The engine process's environment (None: ftx's own)."""
        return None

    def prompt_logprobs(self, base_url: str, api_key: str, model: str, ids: list[int]):
        """HF engines: for every position after the first of the token ids `ids`, the engine's log-probability of
        the actual next token and its own top-1 token id, as two numpy arrays (what the adapter proof compares
        with HF + PEFT). None: the engine cannot tell."""
        return None
