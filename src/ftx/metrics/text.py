"""Generation metrics on held-out answers: the trained format (the recipe's `eval.response_regex`), exact match
against the reference answer, and token F1 (SQuAD's overlap of normalized word tokens)."""

from __future__ import annotations

import re
from collections import Counter

from .base import Metric


class FormatRate(Metric):
    name, label, kind, percent = "format_rate", "follows the trained format", "generation", True

    def applies(self, settings) -> bool:
        return bool(settings.response_regex)

    def per_example(self, output, reference, settings) -> float:
        return float(bool(re.fullmatch(settings.response_regex, output.strip(), re.DOTALL)))


class ExactMatch(Metric):
    name, label, kind, percent = "exact_rate", "exact reference answer", "generation", True

    def per_example(self, output, reference, settings) -> float:
        return float(output.strip() == reference.strip())


def words(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped (SQuAD's normalization without its English article list).
    Letters, marks and digits of any script make words: Python's `\\w` splits Devanagari at its vowel signs, so
    this uses `regex` (a dependency of transformers) with Unicode classes."""
    import regex

    return regex.findall(r"[\p{L}\p{M}\p{N}]+", text.lower())


class TokenF1(Metric):
    name, label, kind, percent = "token_f1", "token F1 vs the reference", "generation", True

    def per_example(self, output, reference, settings) -> float:
        out, ref = words(output), words(reference)
        if not out or not ref:
            return float(out == ref)
        common = sum((Counter(out) & Counter(ref)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(out), common / len(ref)
        return 2 * precision * recall / (precision + recall)
