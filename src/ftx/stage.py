"""The stage seam: what every pipeline stage declares, and the context it runs in.

A stage is one module under ftx/stages/ with a subclass of `Stage` and one line in ftx/pipeline.py:

    class Merge(Stage):
        name = "merge"                    # recipe section, CLI stage name, cache folder, run-card section
        config = MergeConfig              # the section's pydantic model (defaults live here only)
        result = MergeResult              # what run() returns (stage.json, run_card.json)
        needs = ("adapter", "data")       # upstream stages, or what one provides ("adapter": dpo, else train)
        reads = ("name", "train.method")  # recipe settings outside its own section that it uses
        def run(self, ctx, out): ...      # writes into `out` (a temp dir renamed into place when it returns)

The runner derives every cache key the same way from these declarations: the section (minus NOT_KEYED fields),
the declared reads, the keys of the resolved upstream stages, and the content hash of every input file
(`InputPath` fields of the section and of the reads, plus `extra_inputs`). A stage can reach only what it
declared (`ctx.setting` refuses anything else), so nothing it uses is missing from its key. Stages never
import each other: what they share lives in ftx.core and the other seams (engines, formats, packaging,
metrics, bench)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from .core.config import key_dump


class StageRun(BaseModel):
    name: str
    key: str
    dir: str
    cached: bool
    wall_s: float = Field(description="time of the computation (the original run when cached)")
    peak_rss_mb: float
    result: dict


@dataclass
class Artifact:
    """A file or folder of a stage's output that the run directory shows at its top level."""

    src: str  # relative to the stage's output directory
    name: str  # name in the run directory (a later stage's artifact of the same name wins)
    copy: bool = False  # copy (small files: plots, Modelfiles) instead of a relative symlink into the cache
    optional: bool = False  # only if the stage wrote it


class Stage:
    name: ClassVar[str]
    config: ClassVar[type[BaseModel]]
    result: ClassVar[type[BaseModel]]
    optional: ClassVar[bool] = False  # the recipe may leave the section out; the stage is then skipped
    needs: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[str | None] = None  # a name downstream stages can need instead of this stage's name
    reads: ClassVar[tuple[str, ...]] = ()
    # bump when the stage computes something else from the same inputs, so that cached results are not reused;
    # part of the cache key from 2 on (1 is left out, which keeps the keys of caches made before it existed)
    revision: ClassVar[int] = 1

    # --- what the runner asks before running anything
    def upstream(self, recipe) -> tuple[str, ...]:
        """The needs for this recipe (a stage whose inputs depend on its settings overrides this)."""
        return self.needs

    def key_config(self, section: BaseModel) -> Any:
        return key_dump(section)

    def extra_inputs(self, ctx: Context) -> dict[str, Path]:
        """Files the stage reads that no config field names (the base model's weights), hashed into its key."""
        return {}

    def prepare(self, ctx: Context) -> Any:
        """Validate what can be validated before any stage runs (bad data fails before hours of training); the
        value is kept in ctx.prepared. Called only when the stage will run."""
        return None

    def validate(self, recipe, doc) -> None:
        """Checks across sections when the recipe loads (raise doc.fail(loc, message): file:line of the key)."""

    def service(self, ctx: Context):
        """A live resource downstream stages use while they run (the serve stage's endpoint): a context manager,
        entered by the runner when this stage or a stage that needs it runs, left at the end of the run."""
        return None

    def run(self, ctx: Context, out: Path) -> BaseModel:
        raise NotImplementedError

    # --- what the run card and run directory show
    def headline(self, r: dict) -> str:
        return ""

    def artifacts(self, r: dict) -> list[Artifact]:
        return []

    def card_data(self, r: dict, recipe: str) -> dict:
        """The result as the run card's template sees it (e.g. samples trimmed); `recipe`: the recipe's name."""
        return r


class Context:
    """What a running stage sees: its own section (`cfg`), the settings it declared (`setting`), its upstream
    stages' outputs (`upstream`, `file`), the base model, prepared values and live services."""

    def __init__(self, runner, stage: Stage):
        self._runner, self.stage = runner, stage
        self.cfg = getattr(runner.recipe, stage.name)
        self.console = runner.console
        self.out_root = runner.out_root
        self.recipe_name = (
            runner.recipe.name
        )  # for labels and log paths only; a stage whose output uses it reads "name"

    @property
    def key(self) -> str:
        return self._runner.keys[self.stage.name]

    def setting(self, path: str) -> Any:
        if path not in self.stage.reads:
            raise RuntimeError(f"stage {self.stage.name} reads {path!r} without declaring it in `reads`")
        value = self._runner.recipe
        for part in path.split("."):
            value = getattr(value, part)
        return value

    def upstream(self, need: str) -> StageRun:
        if need not in self.stage.upstream(self._runner.recipe):
            raise RuntimeError(f"stage {self.stage.name} uses {need!r} without declaring it in `needs`")
        return self._runner.runs[self._runner.resolve(need)]

    def file(self, need: str, rel: str | None) -> Path | None:
        """A path inside an upstream stage's output (None stays None: an optional file it did not write)."""
        return None if rel is None else Path(self.upstream(need).dir) / rel

    @property
    def base_dir(self) -> Path:
        return self._runner.base_dir()

    @property
    def prepared(self) -> Any:
        return self._runner.prepared.get(self.stage.name)

    def service(self, name: str) -> Any:
        return self._runner.open_service(name)

    def status(self, text: str):
        """A spinner while something slow happens (nothing without a console)."""
        return self.console.status(text) if self.console else contextlib.nullcontext()
