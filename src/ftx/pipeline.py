"""The pipeline: the stage registry and the recipe schema built from it.

To add a stage, write ftx/stages/<name>.py (a `Stage` subclass, see ftx.stage) and add it to STAGES below, in
pipeline order. The recipe gets a `<name>:` section with the stage's config model, the CLI's stage names
(`--force`, `--until`) and the run card's sections come from this list, and the runner (ftx.runner) keys,
caches and runs it like every other stage."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, create_model

from .core.config import OutputDir
from .core.errors import FtxError
from .stages.bench import Bench
from .stages.data import Data
from .stages.dpo import Dpo
from .stages.eval import Eval
from .stages.export import Export
from .stages.merge import Merge
from .stages.serve import Serve
from .stages.train import Train

STAGES = [Data(), Train(), Dpo(), Eval(), Merge(), Export(), Serve(), Bench()]
NAMES = tuple(s.name for s in STAGES)


class RecipeBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the run's name: run directory, model name when served, GGUF metadata",
    )
    base_model: str = Field(
        description="a packaged model (smollm2-135m-instruct), a local HF directory, or a hub "
        "id already in the local Hugging Face cache (ftx never downloads)"
    )
    license: str | None = Field(
        None,
        description="SPDX id of the fine-tuned model (model card, GGUF); default: the base model's, when ftx knows it",
    )
    output_dir: OutputDir = Field(
        OutputDir("runs"), description="runs and the stage cache, relative to the recipe (like every path in a recipe)"
    )
    bundle: OutputDir | None = Field(
        None,
        description="also write a self-contained folder to copy to an edge device: "
        "the served GGUF(s), Modelfile(s) and proof, run card, license, SHA256SUMS",
    )


def recipe_model(stages: list) -> type[BaseModel]:
    """The recipe schema for a list of stages: one section per stage (optional stages may be absent)."""
    fields = {}
    for s in stages:
        if s.optional:
            fields[s.name] = (s.config | None, Field(None, description=f"{s.name} stage; off when absent"))
        elif any(f.is_required() for f in s.config.model_fields.values()):
            fields[s.name] = (s.config, Field(description=f"{s.name} stage"))
        else:
            fields[s.name] = (s.config, Field(default_factory=s.config, description=f"{s.name} stage"))
    return create_model("Recipe", __base__=RecipeBase, **fields)


Recipe = recipe_model(STAGES)


def load_doc(path: Path, overrides: list[str] | tuple[str, ...] = (), stages: list | None = None):
    """Parse and validate a recipe; returns the config.Loaded document (its .model is the Recipe). Any problem is
    one FtxError naming file:line and the key path."""
    from .core import config

    stages = STAGES if stages is None else stages
    model = Recipe if stages is STAGES else recipe_model(stages)
    doc = config.load(path, model, overrides, what="recipe file")
    for s in stages:
        if getattr(doc.model, s.name, None) is not None:
            s.validate(doc.model, doc)
    return doc


def load(path: Path, overrides: list[str] | tuple[str, ...] = (), stages: list | None = None):
    """Parse and validate a recipe (the Recipe model)."""
    return load_doc(path, overrides, stages).model


def check_output(doc) -> None:
    """output_dir (and bundle) can be written, before any work: one line naming the key otherwise."""
    from .core.cache import writable

    for key in ("output_dir", "bundle"):
        target = getattr(doc.model, key)
        problem = writable(target) if target is not None else None
        if problem:
            raise doc.fail((key,), f"cannot write to {target} ({problem})")


def stage(name: str):
    for s in STAGES:
        if s.name == name:
            return s
    raise FtxError(f"unknown stage {name!r}; stages: {', '.join(NAMES)}")
