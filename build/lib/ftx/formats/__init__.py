"""Export formats: the registry (ftx.formats.base says what a format declares; ftx.formats.gate scores any of
them against its reference)."""

from __future__ import annotations

from .base import Format
from .gguf import Gguf

FORMATS: dict[str, Format] = {f.name: f for f in (Gguf(),)}
