"""Eval metrics: the registry (ftx.metrics.base says what a metric declares) and one table for the run card:
metric × model or artifact (base, fine-tuned, served, ...)."""

from __future__ import annotations

from .base import Metric
from .likelihood import ValLoss, ValPerplexity
from .text import ExactMatch, FormatRate

METRICS: list[Metric] = [ValLoss(), ValPerplexity(), FormatRate(), ExactMatch()]
BY_NAME = {m.name: m for m in METRICS}


def generation_scores(outputs: list[str], references: list[str], settings) -> dict[str, float]:
    return {
        m.name: m.score(outputs, references, settings)
        for m in METRICS
        if m.kind == "generation" and m.applies(settings)
    }


def loss_scores(loss: float, settings) -> dict[str, float]:
    return {m.name: m.from_loss(loss) for m in METRICS if m.kind == "loss" and m.applies(settings)}


def by_metric(per_model: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{model: {metric: v}} -> {metric: {model: v}} in registry order."""
    out: dict[str, dict[str, float]] = {}
    for m in METRICS:
        row = {model: scores[m.name] for model, scores in per_model.items() if m.name in scores}
        if row:
            out[m.name] = row
    return out


def table(values: dict[str, dict[str, float]], columns: list[str], labels: dict[str, str] | None = None) -> str:
    """Markdown: one row per metric of `values` ({metric: {column: value}}), one column per entry of `columns`."""
    labels = labels or {}
    head = "| | " + " | ".join(labels.get(c, c) for c in columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    rows = []
    for name, row in values.items():
        m = BY_NAME.get(name)
        cells = [m.fmt(row.get(c)) if m else str(row.get(c, "—")) for c in columns]
        rows.append(f"| {m.label if m else name} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"
