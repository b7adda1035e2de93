"""Loss metrics on the validation split: the mean loss over the tokens training optimizes, and its perplexity."""

from __future__ import annotations

import math

from .base import Metric


class ValLoss(Metric):
    name, label, kind, higher_is_better = "val_loss", "val loss (response tokens)", "loss", False

    def from_loss(self, loss: float) -> float:
        return loss


class ValPerplexity(Metric):
    name, label, kind, higher_is_better = "val_perplexity", "val perplexity", "loss", False

    def from_loss(self, loss: float) -> float:
        return math.exp(min(loss, 50))

    def fmt(self, value):
        return "—" if value is None else f"{value:.3f}"
