"""Overlap metrics against the reference answer, from the libraries the field reports them with (each figure's
library and version, and sacreBLEU's signature, go into the run card through `provenance`):

    ROUGE-L   rouge-score's longest-common-subsequence F-measure, mean over answers. Its default tokenizer keeps
              only [a-z0-9] and so scores any non-Latin answer 0; ftx gives it the Unicode word tokens of token F1.
    chrF      sacreBLEU's character n-gram F-score (chrF2), per answer; for translation the corpus figure.
    BLEU      sacreBLEU's corpus BLEU (translation only: `eval.task: translation`), with its signature string.

Corpus figures (`Metric.corpus`) are not means of answer scores; their 95% intervals resample the answers and
recompute the corpus score (ftx.metrics.intervals.interval_of)."""

from __future__ import annotations

from functools import cache

from .base import Metric
from .text import words


class _Words:
    """rouge-score's tokenizer interface (`tokenize`), with token F1's Unicode word tokens."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


@cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())


class RougeL(Metric):
    name, label, kind, percent = "rouge_l", "ROUGE-L F vs the reference", "generation", True
    library = "rouge-score"

    def per_example(self, output, reference, settings) -> float:
        if not words(output) or not words(reference):
            return float(words(output) == words(reference))
        return float(_rouge().score(reference, output)["rougeL"].fmeasure)


def _task(settings) -> str:
    return getattr(settings, "task", "chat")


class ChrF(Metric):
    name, label, kind, percent = "chrf", "chrF vs the reference", "generation", True
    library = "sacrebleu"

    def per_example(self, output, reference, settings) -> float:
        return _chrf().sentence_score(output, [reference]).score / 100

    def corpus(self, outputs, references, settings) -> float | None:
        if _task(settings) != "translation":
            return None
        return _chrf().corpus_score(list(outputs), [list(references)]).score / 100

    def signature(self, settings) -> str | None:
        return str(_chrf().get_signature())


class Bleu(Metric):
    name, label, kind = "bleu", "sacreBLEU (corpus)", "generation"
    library = "sacrebleu"

    def applies(self, settings) -> bool:
        return _task(settings) == "translation"

    def per_example(self, output, reference, settings) -> float:
        return _bleu(sentence=True).sentence_score(output, [reference]).score

    def corpus(self, outputs, references, settings) -> float | None:
        return _bleu().corpus_score(list(outputs), [list(references)]).score

    def signature(self, settings) -> str | None:
        return str(_bleu().get_signature())

    def fmt(self, value):
        return "—" if value is None else f"{value:.1f}"


@cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


@cache
def _bleu(sentence: bool = False):
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=sentence)
