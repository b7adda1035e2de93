"""The packaging seam: steps that run after an export format produced and the gate selected its artifacts
(a proven Ollama Modelfile, the adapter as a GGUF LoRA). A step is one module in ftx/packaging/ with a subclass
of `Step` and one line in ftx/packaging/__init__.py; its setting becomes the recipe's `export.<name>` key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel


@dataclass
class Job:
    """What the export produced, for the packaging steps."""

    cfg: Any  # the export section
    out: Path  # the export's output directory (files are written here)
    name: str  # the recipe's name (model names, Modelfile)
    num_ctx: int  # context length for runtimes (the training sequence length)
    tok: Any  # the model's tokenizer
    model_dir: Path  # the merged HF model
    files: list  # the exported artifacts (ExportFile)
    selected: str  # the artifact the gate selected
    seqs: list[list[int]]  # validation token sequences
    ref_logits: Any  # the HF model's logits on `seqs`
    base_dir: Path | None = None
    adapter_dir: Path | None = None
    extra_stops: list[str] = field(default_factory=list)  # end tokens the termination check added to the stop set


class Step:
    name: ClassVar[str]
    settings: ClassVar[Any]  # the type of `export.<name>` (a model, or bool)
    default: ClassVar[Any]
    description: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # export formats the step works with

    def enabled(self, value) -> bool:
        return bool(value)

    def check(self, value, export_cfg, artifact_names: list[str]) -> None:
        """Refuse, when the recipe loads, settings that cannot work (raise ValueError with the reason)."""

    def run(self, value, job: Job) -> BaseModel:
        raise NotImplementedError

    def card(self, r: dict, recipe: str) -> str:
        """Markdown for the run card's export section."""
        return ""
