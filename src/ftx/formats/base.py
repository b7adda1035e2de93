"""The export-format seam: what a format declares. A format is one module in ftx/formats/ with a subclass of
`Format` and one line in ftx/formats/__init__.py; its settings become the recipe's `export.<name>:` section.

The export stage asks a format for a reference artifact (the converted model at full precision) and for its
variants (quantized files), and for the log-probabilities each assigns to token sequences; the quality gate
(ftx.formats.gate) scores every variant against the reference from those log-probabilities alone, so the gate
does not know what a GGUF is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel


class Format:
    name: ClassVar[str]
    settings: ClassVar[type[BaseModel]]

    def check(self, settings, model_dir: Path, out: Path) -> None:
        """Refuse before any work what cannot be exported (unknown architecture, too little disk)."""

    def artifact_names(self, settings) -> list[str]:
        """Names of the artifacts these settings produce, reference first."""
        raise NotImplementedError

    def reference(
        self, settings, model_dir: Path, out: Path, name: str, lineage: str | None, base_model: str | None
    ) -> tuple[str, Path]:
        """Convert the merged HF model (named `name`, with ftx's lineage key and the base model's name in its
        metadata); returns (name, file) of the full-precision reference artifact."""
        raise NotImplementedError

    def variants(
        self, settings, reference: Path, out: Path, calibration: list[str] | None
    ) -> Iterator[tuple[str, Path]]:
        """Produce the smaller artifacts, largest first, as (name, file); `calibration`: texts for an importance
        matrix when the settings ask for one."""
        raise NotImplementedError

    def logits(self, path: Path, seqs: list[list[int]]):
        """Logits at every position of every sequence, concatenated: [tokens, vocab] (numpy)."""
        raise NotImplementedError

    def logprobs(self, path: Path, seqs: list[list[int]]) -> Iterator[tuple[object, list[int]]]:
        """(log-probabilities [n, vocab], token ids) per sequence."""
        raise NotImplementedError

    def generate(self, path: Path, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], dict[int, str]]:
        """Greedy answers to prompt token ids as the format's runtime produces them, each ending on the first
        token the runtime stops on, or after `max_tokens`; and those end tokens {id: text}."""
        raise NotImplementedError

    def metadata(self, path: Path) -> dict:
        """What the artifact itself says about how to use it: its end tokens and chat template, when it says."""
        return {}

    def search(self, settings, target, reference: Path, out: Path, calibration, score, progress):
        """A variant searched to a size budget (`target`: ftx.formats.search.Target): returns (name, file,
        report). `score(file)`: its mean KLD vs the reference on the search text; `progress(text)`: status."""
        from ..core.errors import FtxError

        raise FtxError(f"export.target: the {self.name} format has no size-targeted quant search")

    def extras(self, settings, out: Path) -> dict:
        """Facts for the result beyond the files (e.g. the importance matrix used)."""
        return {}
