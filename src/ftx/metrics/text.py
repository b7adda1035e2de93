"""Generation metrics on held-out answers: the trained format (the recipe's `eval.response_regex`), exact match
against the reference answer, token F1 (SQuAD's overlap of normalized word tokens), and how long answers are
and how many ran to the token limit (a fine-tune that forgot to stop shows here before anywhere else)."""

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


class AnswerWords(Metric):
    name, label, kind = "answer_words", "answer length (words)", "generation"
    higher_is_better = None  # informative: neither direction is better by itself

    def per_example(self, output, reference, settings) -> float:
        return float(len(words(output)))

    def fmt(self, value):
        return "—" if value is None else f"{value:.1f}"


class Truncated(Metric):
    name, label, kind, percent = "truncated", "ran to the token limit", "generation", True
    higher_is_better = False

    def applies_to(self, outputs) -> bool:
        return all(getattr(o, "truncated", None) is not None for o in outputs)

    def per_example(self, output, reference, settings) -> float:
        return float(bool(getattr(output, "truncated", False)))
