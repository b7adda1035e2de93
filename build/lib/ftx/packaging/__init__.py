"""Packaging steps after an export: the registry (ftx.packaging.base says what a step declares)."""

from __future__ import annotations

from .base import Job, Step
from .gguf_lora import GgufLoraStep
from .modelfile import ModelfileStep

STEPS: list[Step] = [ModelfileStep(), GgufLoraStep()]

__all__ = ["Job", "STEPS", "Step"]
