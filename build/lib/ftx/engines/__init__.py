"""Serving engines: the registry (ftx.engines.base says what an engine declares; ftx.serving starts any of them)."""

from __future__ import annotations

from .base import Engine
from .llamacpp import LlamaCpp
from .vllm import Vllm

ENGINES: dict[str, Engine] = {e.name: e for e in (LlamaCpp(), Vllm())}
