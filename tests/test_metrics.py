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


def test_rouge_l_and_chrf_score_non_latin_answers():
    """rouge-score's own tokenizer keeps [a-z0-9] only, so any Devanagari or Japanese answer would score 0."""
    from ftx.metrics.overlap import ChrF, RougeL

    assert RougeL().per_example("मुंबई एक शहर है", "मुंबई एक बड़ा शहर है", SETTINGS) == pytest.approx(2 * 1 * 0.8 / 1.8)
    assert RougeL().per_example("the cat sat on the mat", "the cat sat on the mat", SETTINGS) == 1.0
    assert RougeL().per_example("a dog", "the cat", SETTINGS) == 0.0
    assert ChrF().per_example("東京です", "東京です", SETTINGS) == pytest.approx(1.0)
    assert 0 < ChrF().per_example("東京でした", "東京です", SETTINGS) < 1


def test_translation_uses_corpus_bleu_with_its_signature_and_a_resampled_interval():
    import sacrebleu

    s = SimpleNamespace(response_regex=None, task="translation")
    refs = ["the cat sat on the mat", "a dog barked at night", "it is raining today", "we went home early"]
    outs = {"base": ["a cat sat on a mat", "the dog barked", "rain today", "we went home"], "ft": refs}
    r = metrics.assess(outs, refs, s, "base")
    assert r["scores"]["base"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs["base"], [refs]).score)
    assert r["scores"]["ft"]["bleu"] == pytest.approx(100.0)
    assert r["scores"]["ft"]["chrf"] == pytest.approx(1.0)  # the corpus chrF, not a mean of sentences
    lo, hi = r["intervals"]["bleu"]["base"]
    assert lo <= r["scores"]["base"]["bleu"] <= hi and lo < hi
    assert r["deltas"]["bleu"]["ft"]["delta"] > 0 and r["deltas"]["bleu"]["ft"]["low"] > 0
    sig = metrics.provenance(s)
    assert "tok:13a" in sig["bleu"] and "version:" in sig["chrf"] and sig["rouge_l"].startswith("rouge-score ")
    assert "bleu" not in metrics.per_example(outs["base"], refs, SETTINGS)  # chat: no BLEU


def test_structured_metrics_parse_validate_and_compare_fields(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "required": ["city", "n"], "properties": {"n": {"type": "integer"}}}')
    s = SimpleNamespace(response_regex=None, task="structured", json_schema=schema)
    ref = '{"city": "Oslo", "n": 3, "tags": ["a", "b"]}'
    outs = [
        ref,
        '```json\n{"city": "Oslo", "n": "3", "tags": ["a", "c"]}\n```',  # fenced: parsed; n a string: invalid
        '{"city": "Oslo"',  # not JSON
    ]
    per = metrics.per_example(outs, [ref] * 3, s)
    assert per["json_valid"] == [1.0, 1.0, 0.0]
    assert per["json_schema"] == [1.0, 0.0, 0.0]
    assert per["json_fields"] == [1.0, pytest.approx(2 / 4), 0.0]  # of city, n, tags[0], tags[1]: city and tags[0]
    assert "json_valid" not in metrics.per_example(outs, [ref] * 3, SETTINGS)


def test_answer_length_and_truncation_where_the_generator_says():
    from ftx.core.chat import Answer

    outs = [Answer.of("one two three", 4, False), Answer.of("a b c d e f", 16, True)]
    per = metrics.per_example(outs, ["x", "y"], SETTINGS)
    assert per["answer_words"] == [3.0, 6.0] and per["truncated"] == [0.0, 1.0]
    assert "truncated" not in metrics.per_example(["plain text"], ["x"], SETTINGS)  # unknown: not reported as 0


def test_forgetting_gate_fails_the_run_with_the_table():
    from ftx.core.errors import FtxError
    from ftx.metrics import ifeval
    from ftx.stages.eval import EvalConfig, _forgetting

    rows = [r for r in ifeval.load_prompts() if r["instruction_id_list"] == ["punctuation:no_comma"]][:8]
    good, bad = ["This answer has no commas at all."] * len(rows), ["Yes, it has, commas."] * len(rows)
    with pytest.raises(FtxError, match=r"fell by 100\.0 points \(allowed 5\.0\)(.|\n)*\| prompt-level loose \|"):
        _forgetting(EvalConfig(max_forgetting=0.05), rows, {"base": good, "finetuned": bad})
    r = _forgetting(EvalConfig(max_forgetting=0.05), rows, {"base": bad, "finetuned": good})
    assert r.drop == -1.0 and r.by_type["punctuation:no_comma"]["finetuned"]["loose"] == 1.0


def test_eval_settings_words_and_refusals():
    from pydantic import ValidationError

    from ftx.stages.eval import EvalConfig

    assert EvalConfig(forgetting="full").forgetting.prompts is None
    assert EvalConfig(forgetting="quick").forgetting.prompts == 120
    with pytest.raises(ValidationError, match="max_forgetting needs the forgetting check"):
        EvalConfig(forgetting=None, max_forgetting=0.05)
    with pytest.raises(ValidationError, match=r"\[\[A\]\]"):
        EvalConfig(judge={"rubric": "Which is better? {question} {answer_a} {answer_b}"})
