"""Eval metrics against known values, and the 95% intervals around them: a bootstrap of the mean and of the paired
difference of two models on the same prompts."""

from types import SimpleNamespace

import numpy as np
import pytest

from ftx import metrics
from ftx.metrics.intervals import interval, paired_delta
from ftx.metrics.text import TokenF1, words

SETTINGS = SimpleNamespace(response_regex=r'\{"answer": "[^"]*"\}')


@pytest.mark.parametrize(
    "output, reference, f1",
    [
        ("the cat sat", "the cat sat on the mat", 2 * 1 * 0.5 / 1.5),  # SQuAD's overlap: P 3/3, R 3/6
        ("The Cat, sat!", "the cat sat", 1.0),  # case and punctuation do not count
        ("a dog", "the cat", 0.0),
        ("東京 です", "東京", 2 * 0.5 * 1 / 1.5),  # words in any script count (not zeroed out as non-Latin)
        ("Привет мир", "привет", 2 * 0.5 * 1 / 1.5),
        ("", "", 1.0),
        ("", "x", 0.0),
    ],
)
def test_token_f1_known_values(output, reference, f1):
    assert TokenF1().per_example(output, reference, SETTINGS) == pytest.approx(f1)


def test_words_keep_non_latin_scripts():
    assert words("Ça va? 東京, मुंबई") == ["ça", "va", "東京", "मुंबई"]


def test_generation_scores_are_the_mean_of_the_per_example_scores():
    outs = ['{"answer": "4"}', "four", '{"answer": "5"}', '{"answer": "4"}']
    refs = ['{"answer": "4"}'] * 4
    per = metrics.per_example(outs, refs, SETTINGS)
    assert per["format_rate"] == [1, 0, 1, 1] and per["exact_rate"] == [1, 0, 0, 1]
    assert metrics.generation_scores(outs, refs, SETTINGS) == {k: np.mean(v) for k, v in per.items()}


def test_interval_of_the_mean():
    assert interval([1.0] * 24) == [1.0, 1.0]
    lo, hi = interval([0.0, 1.0] * 12)
    assert lo < 0.5 < hi and lo > 0.2 and hi < 0.8  # about ±0.2 for 24 coin flips
    assert interval([0.0, 1.0] * 12) == [lo, hi]  # seeded: the same answers give the same interval
    lo_many, hi_many = interval([0.0, 1.0] * 200)
    assert hi_many - lo_many < (hi - lo) / 3  # narrower with more prompts (1/sqrt(n))


def test_paired_difference_cancels_what_both_models_share():
    base = [0.0, 1.0] * 12
    assert paired_delta(base, [v + 1 for v in base]) == pytest.approx({"delta": 1.0, "low": 1.0, "high": 1.0})
    # unpaired, intervals of 0.5 +- 0.2 and 1.0 would barely separate; paired, every resample differs by 0.5
    d = paired_delta(base, [1.0] * 24)
    assert d["delta"] == 0.5 and 0.2 < d["low"] <= d["high"] < 0.8
    assert paired_delta(base, base) == {"delta": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError):
        paired_delta([1.0], [1.0, 0.0])


def test_uncertainty_and_the_table():
    examples = {
        "base": {"format_rate": [0.0] * 20 + [1.0] * 4},
        "finetuned": {"format_rate": [1.0] * 22 + [0.0] * 2},
    }
    intervals, deltas = metrics.uncertainty(examples, "base")
    assert set(intervals["format_rate"]) == {"base", "finetuned"} and set(deltas["format_rate"]) == {"finetuned"}
    d = deltas["format_rate"]["finetuned"]
    assert d["delta"] == pytest.approx(22 / 24 - 4 / 24) and d["low"] > 0.4
    values = {"format_rate": {"base": 4 / 24, "finetuned": 22 / 24}}
    md = metrics.table(values, ["base", "finetuned"], {"finetuned": "fine-tuned"}, intervals, deltas)
    head, _, row = md.splitlines()
    assert "Δ fine-tuned (95% CI)" in head
    assert row.startswith("| follows the trained format | 17% [") and "| +75% [+" in row


def test_flips_count_answers_whose_verdict_changed():
    from ftx import metrics

    ref = {"format_rate": [1.0, 1.0, 0.0, 1.0], "exact_rate": [1.0, 0.0, 0.0, 0.0], "token_f1": [1.0, 0.5, 0.2, 0.3]}
    q = {"format_rate": [1.0, 0.0, 1.0, 1.0], "exact_rate": [0.0, 0.0, 0.0, 0.0], "token_f1": [0.9, 0.5, 0.2, 0.3]}
    f = metrics.flips(ref, q)
    assert (f["format_rate_lost"], f["format_rate_gained"], f["exact_rate_lost"]) == (1, 1, 1)
    assert "token_f1_lost" not in f  # not a pass/fail metric
    assert f["flips"] == 3 and f["flip_rate"] == 0.75  # answers 0, 1 and 2 changed a verdict
    assert metrics.flips(ref, ref)["flips"] == 0
