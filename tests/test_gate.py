"""The quality gate scores what the served model produces: assistant tokens carry the verdict, a prompt prefix
shared by every conversation (a default system prompt) is counted once in the all-token figures, and the PPL
ratio is checked both ways. Synthetic log-probabilities: this is the arithmetic, the e2e export tests run it on
real quants."""

import numpy as np
import pytest

from ftx.formats import gate

V, SYSTEM, USER, ANSWER, N = 16, 40, 5, 6, 10


def conversations():
    """N conversations: the same 40-token system prompt, a distinct 5-token user turn, a 6-token answer."""
    rng = np.random.default_rng(0)
    system = rng.integers(0, V, SYSTEM).tolist()
    rows = []
    for i in range(N):
        user = [i % V, *rng.integers(0, V, USER - 1).tolist()]  # the first user token differs between rows
        answer = rng.integers(0, V, ANSWER).tolist()
        ids = system + user + answer
        rows.append({"input_ids": ids, "labels": [-100] * (SYSTEM + USER) + answer})
    return rows


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logprobs(rows, noise_seed=None):
    """Per-sequence log-probs; the positions inside the shared system prompt are identical in every row (same
    context, same prediction), as a real model's are. With `noise_seed`: a variant, far from the reference on the
    prompt (noise 1.0) and close on the answer (0.05)."""
    shared = np.random.default_rng(0).normal(0, 1, (SYSTEM, V))
    if noise_seed is not None:
        shared = shared + np.random.default_rng(noise_seed).normal(0, 1.0, shared.shape)
    out = []
    for i, r in enumerate(rows):
        own = np.random.default_rng(100 + i).normal(0, 1, (len(r["input_ids"]) - SYSTEM, V))
        if noise_seed is not None:
            scale = np.full((len(own), 1), 0.05)
            scale[: USER - 1] = 1.0  # the user turn's positions (the last one predicts the answer's first token)
            own = own + np.random.default_rng(noise_seed + 1 + i).normal(0, 1, own.shape) * scale
        out.append((log_softmax(np.concatenate([shared, own])).astype(np.float32), r["input_ids"]))
    return out


def kl(p, q):
    return (np.exp(p) * (p - q)).sum(-1)


def test_a_shared_system_prompt_no_longer_dominates_the_gate(tmp_path):
    rows = conversations()
    seqs = [r["input_ids"] for r in rows]
    pos = gate.Positions(rows)
    assert pos.split == {
        "positions": N * (SYSTEM + USER + ANSWER - 1),
        "assistant": N * ANSWER,
        "prompt": N * (SYSTEM + USER - 1),
        "prompt_repeated": (N - 1) * (SYSTEM - 1),  # every position inside the shared prefix after the first row
        "assistant_repeated": 0,
    }
    # the reference, and a variant close on the answers but far on the prompt
    ref, variant = logprobs(rows), logprobs(rows, noise_seed=7)

    scored = gate.save_reference(ref, seqs, tmp_path / "ref.npy", pos)
    m = gate.compare(variant, tmp_path / "ref.npy", scored)
    every = gate.save_reference(ref, seqs, tmp_path / "every.npy")  # the old scoring: every position, repeats too
    old = gate.compare(variant, tmp_path / "every.npy", every)

    per_pos = [kl(r[0][:-1], v[0][:-1]) for r, v in zip(ref, variant)]
    answers = np.concatenate([k[SYSTEM + USER - 1 :] for k in per_pos])
    unique = np.concatenate([per_pos[0], *[k[SYSTEM - 1 :] for k in per_pos[1:]]])
    assert m["mean_kld"] == pytest.approx(answers.mean(), rel=1e-2)  # the gate: assistant tokens only
    assert m["all_mean_kld"] == pytest.approx(unique.mean(), rel=1e-2)  # the prefix once
    assert old["mean_kld"] == pytest.approx(np.concatenate(per_pos).mean(), rel=1e-2)
    # under the old scoring the repeated prompt carries most of the divergence and fails the quant
    assert old["mean_kld"] > 0.05 > m["mean_kld"] and m["all_mean_kld"] < old["mean_kld"]
    assert gate.QualityGate(max_ppl_ratio=None).within(m)
    assert not gate.QualityGate(max_ppl_ratio=None).within(old)


def test_rows_without_assistant_tokens_score_every_unique_position():
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100] * 4}, {"input_ids": [1, 2, 5], "labels": [-100] * 3}]
    pos = gate.Positions(rows)
    assert [t.tolist() for t in pos.target] == [[True, True, True], [False, True]]


@pytest.mark.parametrize("ratio, ok", [(1.0, True), (1.04, True), (0.96, True), (1.06, False), (0.875, False)])
def test_the_ppl_ratio_is_checked_both_ways(ratio, ok):
    g = gate.QualityGate(max_mean_kld=None, max_ppl_ratio=1.05)
    assert g.within({"mean_kld": 0.0, "ppl_ratio": ratio, "p99_kld": 0.0, "same_top": 1.0}) is ok


class _Answers:
    """A format whose runtime's answers are given (the classification is pure logic; the real one is e2e)."""

    EOG = {2: "<|im_end|>", 0: "<|endoftext|>"}

    def __init__(self, answers: dict):
        self.answers = answers

    def generate(self, path, prompts, max_tokens):
        return self.answers[path], self.EOG

    def metadata(self, path):
        return {"end_ids": [2], "chat_template": "T"}


def test_termination_classifies_how_answers_end_and_gates_the_variants():
    from ftx.core.errors import FtxError
    from ftx.formats import termination as T

    clean, other, runaway = [5, 6, 2], [5, 0], [5] * 8
    fmt = _Answers({"ref": [clean] * 19 + [other], "q": [clean] * 10 + [runaway] * 10})
    cfg = T.Termination(max_tokens=8)
    r = T.check(fmt, [("f16", "ref"), ("q4", "q")], [[1]] * 20, {2: "<|im_end|>"}, cfg, "T")
    assert r.stop_set == ["<|im_end|>"] and r.template_matches and r.artifact_end_ids == ["<|im_end|>"]
    assert r.files["f16"].clean_stop_rate == 0.95 and r.files["f16"].ends == {"<|im_end|>": 19, "<|endoftext|>": 1}
    assert r.files["q4"].ends == {"<|im_end|>": 10, T.RUNAWAY: 10} and r.files["q4"].clean_stop_rate == 0.5
    # the fine-tune itself ends on another end token: the export fails, naming it, unless told to extend
    fmt = _Answers({"ref": [other] * 18 + [clean] * 2})
    with pytest.raises(FtxError, match=r"ends only 10% of 20 .* ended on <\|endoftext\|> 18x, <\|im_end\|> 2x"):
        T.check(fmt, [("f16", "ref")], [[1]] * 20, {2: "<|im_end|>"}, cfg, "T")
    r = T.check(
        fmt, [("f16", "ref")], [[1]] * 20, {2: "<|im_end|>"}, cfg.model_copy(update={"other_end_token": "extend"}), "X"
    )
    assert r.extended == ["<|endoftext|>"] and r.files["f16"].clean_stop_rate == 1.0 and "added" in r.note
    assert r.template_matches is False
    # runaway answers are never fixed by extending the stop set
    fmt = _Answers({"ref": [runaway] * 20})
    with pytest.raises(FtxError, match="run away"):
        T.check(
            fmt,
            [("f16", "ref")],
            [[1]] * 20,
            {2: "<|im_end|>"},
            cfg.model_copy(update={"other_end_token": "extend"}),
            "T",
        )


def test_task_budgets_gate_on_the_answers_and_need_them():
    from pydantic import ValidationError

    from ftx.stages.export import ExportConfig

    g = gate.QualityGate(max_mean_kld=0.05, min_task_ratio=0.9, max_flip_rate=0.1)
    m = {"mean_kld": 0.01, "ppl_ratio": 1.0, "p99_kld": 0.1, "same_top": 0.99}
    assert g.within({**m, "task_ratio": {"format_rate": 1.0, "exact_rate": 0.95}, "flip_rate": 0.05})
    assert not g.within({**m, "task_ratio": {"format_rate": 1.0, "exact_rate": 0.8}, "flip_rate": 0.05})
    assert not g.within({**m, "task_ratio": {"format_rate": 1.0}, "flip_rate": 0.2})
    with pytest.raises(ValidationError, match="need the held-out answers of termination"):
        ExportConfig(quality_gate={"max_flip_rate": 0.1}, termination=None)
