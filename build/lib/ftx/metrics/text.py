"""Generation metrics on held-out answers: the trained format (the recipe's `eval.response_regex`) and exact
match against the reference answer."""

from __future__ import annotations

import re

from .base import Metric


class FormatRate(Metric):
    name, label, kind, percent = "format_rate", "follows the trained format", "generation", True

    def applies(self, settings) -> bool:
        return bool(settings.response_regex)

    def score(self, outputs, references, settings) -> float:
        pat = re.compile(settings.response_regex, re.DOTALL)
        return sum(bool(pat.fullmatch(t.strip())) for t in outputs) / max(len(outputs), 1)


class ExactMatch(Metric):
    name, label, kind, percent = "exact_rate", "exact reference answer", "generation", True

    def score(self, outputs, references, settings) -> float:
        return sum(t.strip() == r.strip() for t, r in zip(outputs, references)) / max(len(references), 1)
