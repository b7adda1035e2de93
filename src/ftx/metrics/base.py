"""The metric seam: what an eval metric declares. A metric is one module in ftx/metrics/ with a subclass of
`Metric` and one line in ftx/metrics/__init__.py; the eval stage, the serve stage's check and the run card all
go through the registry, so a new metric appears in each of them without touching them."""

from __future__ import annotations

from typing import ClassVar, Literal


class Metric:
    name: ClassVar[str]  # key in results: metrics[name][model]
    label: ClassVar[str]  # row label in the run card's table
    kind: ClassVar[Literal["generation", "loss"]]  # scored on generated answers, or from the response-token loss
    percent: ClassVar[bool] = False  # shown as a percentage
    higher_is_better: ClassVar[bool | None] = True  # None: informative only (an answer's length)
    library: ClassVar[str | None] = None  # the package that computes it (its version goes into the run card)

    def applies(self, settings) -> bool:
        """Whether the recipe's eval settings make this metric meaningful (a regex metric needs a regex)."""
        return True

    def applies_to(self, outputs: list) -> bool:
        """Whether these answers carry what the metric reads (truncation needs a generator that says)."""
        return True

    def corpus(self, outputs: list, references: list[str], settings) -> float | None:
        """A corpus-level figure (sacreBLEU's BLEU) that replaces the mean of the answer scores; None: the mean."""
        return None

    def signature(self, settings) -> str | None:
        """The library's own reproducibility string (sacreBLEU's signature), for the run card."""
        return None

    def per_example(self, output: str, reference: str, settings) -> float:
        """generation metrics: the score of one answer against its reference; the metric's score is the mean
        (ftx.metrics.means) and its interval resamples these."""
        raise NotImplementedError

    def from_loss(self, loss: float) -> float:
        """loss metrics: a figure from the mean loss over the validation split's response tokens."""
        raise NotImplementedError

    def fmt(self, value: float | None) -> str:
        if value is None:
            return "—"
        return f"{100 * value:.0f}%" if self.percent else f"{value:.4f}"
