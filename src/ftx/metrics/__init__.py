"""Eval metrics: the registry (ftx.metrics.base says what a metric declares) and one table for the run card:
metric × model or artifact (base, fine-tuned, served, ...)."""

from __future__ import annotations

from .base import Metric
from .intervals import interval, interval_of, paired_delta, paired_of
from .likelihood import ValLoss, ValPerplexity
from .overlap import Bleu, ChrF, RougeL
from .structured import JsonFields, JsonSchemaValid, JsonValid
from .text import AnswerWords, ExactMatch, FormatRate, TokenF1, Truncated

METRICS: list[Metric] = [
    ValLoss(),
    ValPerplexity(),
    FormatRate(),
    ExactMatch(),
    TokenF1(),
    RougeL(),
    ChrF(),
    Bleu(),
    JsonValid(),
    JsonSchemaValid(),
    JsonFields(),
    AnswerWords(),
    Truncated(),
]
BY_NAME = {m.name: m for m in METRICS}


SETTINGS = ("response_regex", "task", "json_schema")  # the eval settings the metrics read


def settings_of(get) -> object:
    """The metrics' settings from a stage's reads (`get("eval.task")`), so that a stage scoring answers is keyed
    by these settings only, not by the rest of the eval section (its judge, its forgetting check)."""
    from types import SimpleNamespace

    return SimpleNamespace(**{k: get(f"eval.{k}") for k in SETTINGS})


def generation_metrics(settings, outputs: list | None = None) -> list[Metric]:
    """The generation metrics that apply to these settings (and answers, where given)."""
    return [
        m
        for m in METRICS
        if m.kind == "generation" and m.applies(settings) and (outputs is None or m.applies_to(outputs))
    ]


def per_example(outputs: list[str], references: list[str], settings) -> dict[str, list[float]]:
    """{metric: [score of each answer]} for every generation metric that applies."""
    return {
        m.name: [m.per_example(o, r, settings) for o, r in zip(outputs, references)]
        for m in generation_metrics(settings, outputs)
    }


def corpus_scores(outputs: list[str], references: list[str], settings) -> dict[str, float]:
    """The corpus-level figures (sacreBLEU) that replace a metric's mean of answer scores."""
    out = {}
    for m in generation_metrics(settings, outputs):
        v = m.corpus(outputs, references, settings)
        if v is not None:
            out[m.name] = v
    return out


def provenance(settings) -> dict[str, str]:
    """{metric: 'library version' or the library's signature} for the metrics that apply, for the run card."""
    from importlib.metadata import version

    out = {}
    for m in generation_metrics(settings):
        sig = m.signature(settings)
        if sig or m.library:
            out[m.name] = sig or f"{m.library} {version(m.library)}"
    return out


def assess(answers: dict[str, list[str]], references: list[str], settings, baseline: str) -> dict:
    """Every model's (or artifact's) answers to the same prompts, scored: {"examples": {model: {metric: [score of
    each answer]}}, "scores": {model: {metric: figure}} (corpus figures where a metric has one), "intervals":
    {metric: {model: [lo, hi]}}, "deltas": {metric: {model: {delta, low, high}}} paired against `baseline`}."""
    examples = {name: per_example(outs, references, settings) for name, outs in answers.items()}
    corpus = {name: corpus_scores(outs, references, settings) for name, outs in answers.items()}
    scores = {name: {**means(examples[name]), **corpus[name]} for name in answers}
    intervals, deltas = uncertainty(examples, baseline)
    n = len(references)
    for m in (BY_NAME[k] for k in corpus[baseline]):  # corpus figures: resample answers, recompute the figure
        stats = {
            name: (lambda idx, o=outs, m=m: m.corpus([o[i] for i in idx], [references[i] for i in idx], settings))
            for name, outs in answers.items()
        }
        for name, stat in stats.items():
            intervals.setdefault(m.name, {})[name] = interval_of(stat, n)
            if name != baseline:
                deltas.setdefault(m.name, {})[name] = paired_of(stats[baseline], stat, n)
    return {"examples": examples, "scores": scores, "intervals": intervals, "deltas": deltas}


def means(examples: dict[str, list[float]]) -> dict[str, float]:
    """{metric: per-example scores} -> {metric: their mean}."""
    return {k: sum(v) / max(len(v), 1) for k, v in examples.items()}


def generation_scores(outputs: list[str], references: list[str], settings) -> dict[str, float]:
    return {**means(per_example(outputs, references, settings)), **corpus_scores(outputs, references, settings)}


def uncertainty(examples: dict[str, dict[str, list[float]]], baseline: str) -> tuple[dict, dict]:
    """From {model: {metric: per-example scores}} on the same prompts: 95% intervals {metric: {model: [lo, hi]}}
    and paired differences against `baseline` {metric: {model: {delta, low, high}}}."""
    intervals: dict[str, dict[str, list[float]]] = {}
    deltas: dict[str, dict[str, dict[str, float]]] = {}
    for model, scores in examples.items():
        for name, values in scores.items():
            intervals.setdefault(name, {})[model] = interval(values)
            if model != baseline and name in examples.get(baseline, {}):
                deltas.setdefault(name, {})[model] = paired_delta(examples[baseline][name], values)
    return intervals, deltas


def flips(baseline: dict[str, list[float]], other: dict[str, list[float]]) -> dict[str, int | float]:
    """Answers whose verdict changed from `baseline` on a pass/fail metric (scores 0 or 1), per metric and overall:
    {"<metric>_lost": n, "<metric>_gained": n, "flips": answers with any verdict changed, "flip_rate": its share}."""
    out: dict[str, int | float] = {}
    changed: set[int] = set()
    for name, a in baseline.items():
        b = other.get(name)
        if b is None or not all(v in (0.0, 1.0) for v in a + b):
            continue
        out[f"{name}_lost"] = sum(1 for x, y in zip(a, b) if x > y)
        out[f"{name}_gained"] = sum(1 for x, y in zip(a, b) if x < y)
        changed |= {i for i, (x, y) in enumerate(zip(a, b)) if x != y}
    n = len(next(iter(baseline.values()), []))
    out["flips"], out["flip_rate"] = len(changed), len(changed) / n if n else 0.0
    return out


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


def table(
    values: dict[str, dict[str, float]],
    columns: list[str],
    labels: dict[str, str] | None = None,
    intervals: dict | None = None,
    deltas: dict | None = None,
) -> str:
    """Markdown: one row per metric of `values` ({metric: {column: value}}), one column per entry of `columns`,
    each value with its 95% interval where `intervals` has one, then a column per paired difference in `deltas`."""
    labels, intervals, deltas = labels or {}, intervals or {}, deltas or {}
    compared = [c for c in columns if any(c in d for d in deltas.values())]
    heads = [labels.get(c, c) for c in columns] + [f"Δ {labels.get(c, c)} (95% CI)" for c in compared]
    head = "| | " + " | ".join(heads) + " |\n|---|" + "---:|" * len(heads) + "\n"
    rows = []
    for name, row in values.items():
        m = BY_NAME.get(name)
        show = m.fmt if m else str
        cells = []
        for c in columns:
            v, ci = row.get(c), intervals.get(name, {}).get(c)
            cells.append(show(v) + (f" [{show(ci[0])}, {show(ci[1])}]" if ci and ci[0] != ci[1] else ""))
        for c in compared:
            d = deltas.get(name, {}).get(c)
            cells.append(f"{_signed(m, d['delta'])} [{_signed(m, d['low'])}, {_signed(m, d['high'])}]" if d else "")
        rows.append(f"| {m.label if m else name} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def _signed(m: Metric | None, v: float) -> str:
    text = m.fmt(abs(v)) if m else f"{abs(v):.4f}"
    return ("−" if v < 0 else "+") + text
