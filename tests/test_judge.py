"""The pairwise judge (ftx.judge) with fake judges: verdict parsing, both-order aggregation, the sanity checks, the
rubric, the length-controlled win rate, the vendored MT-Bench data and the OpenAI-compatible client."""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ftx import judge
from ftx.core.errors import FtxError

ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


def answers(messages: list[dict]) -> tuple[str, str]:
    found = dict(ANSWER.findall(messages[-1]["content"]))
    return found["A"], found["B"]


def always_a(messages):
    return "Both are fine, but the first one reads better. [[A]]"


def longer(messages):
    """Consistent, content-based: the longer answer wins, equal lengths tie."""
    a, b = answers(messages)
    return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"


def items(n: int, longer_2: int, **extra) -> list[dict]:
    """n pairs; model 2's answer is the longer one in the first `longer_2` of them."""
    out = []
    for i in range(n):
        short, long = "x" * (20 + 7 * i), "y" * (60 + 11 * i)
        a1, a2 = (short, long) if i < longer_2 else (long, short)
        out.append({"id": i, "question": f"question {i}?", "answer_1": a1, "answer_2": a2, **extra})
    return out


# ------------------------------------------------------------------ data
def test_vendored_data_hashes_and_questions():
    folder = judge.resources.files() / "mtbench"
    for name, digest in judge.HASHES.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert (folder / "LICENSE").read_text().startswith(" " * 33 + "Apache License")
    qs = judge.questions()
    assert len(qs) == 80 and all(len(q["turns"]) == 1 for q in qs)
    counts = {}
    for q in qs:
        counts[q["category"]] = counts.get(q["category"], 0) + 1
    assert len(counts) == 8 and set(counts.values()) == {10}
    two = judge.questions(turns=2)
    assert all(len(q["turns"]) == 2 for q in two)
    assert sum(q["reference"] is not None for q in two) == 39
    assert judge.judge_prompt("pair-v2")["output_format"] == "[[A]]"


def test_questions_limit_is_stratified_and_deterministic():
    eight = judge.questions(limit=8)
    assert len({q["category"] for q in eight}) == 8
    twelve = judge.questions(limit=12)
    assert twelve == judge.questions(limit=12)
    per_category = [sum(q["category"] == c for q in twelve) for c in {q["category"] for q in twelve}]
    assert len(twelve) == 12 and max(per_category) - min(per_category) <= 1
    assert {q["question_id"] for q in eight} < {q["question_id"] for q in twelve}
    with pytest.raises(FtxError):
        judge.questions(turns=3)


def test_a_changed_data_file_is_refused(monkeypatch):
    monkeypatch.setitem(judge.HASHES, "question.jsonl", "0" * 64)
    with pytest.raises(FtxError, match="sha256"):
        judge.questions()


# ------------------------------------------------------------------ prompts and verdicts
@pytest.mark.parametrize(
    "output, verdict",
    [
        ("A is more accurate. [[A]]", "A"),
        ("[[B]]", "B"),
        ("Equally good: [[C]]", "C"),
        ('Format: "[[A]]" if A is better, "[[B]]" if B is better. My verdict: [[B]]', "B"),
        ("I prefer assistant A.", "error"),
        ("[A]", "error"),
        ("[[D]]", "error"),
        ("", "error"),
        (None, "error"),
    ],
)
def test_parse_verdict(output, verdict):
    assert judge.parse_verdict(output) == verdict


def test_pair_v2_messages_are_fastchats():
    prompt = judge.judge_prompt("pair-v2")
    system, user = judge.pair_messages("What is 2+2?", "4", "five")
    assert system == {"role": "system", "content": prompt["system_prompt"]}
    assert user["role"] == "user" and answers([user]) == ("4", "five")
    assert "[User Question]\nWhat is 2+2?" in user["content"]
    multi = judge.pair_messages(["q1", "q2"], ["a1", "a2"], ["b1", "b2"])
    assert multi[0]["content"] == judge.judge_prompt("pair-v2-multi-turn")["system_prompt"]
    assert "### User:\nq2\n\n### Assistant B:\nb2" in multi[1]["content"]


def test_rubric_validation():
    good = "Q: {question}\nA: {answer_a}\nB: {answer_b}\nAnswer [[A]], [[B]] or [[C]] for a tie; JSON is {{}}."
    assert judge.check_rubric(good) == good
    bad = {
        "Q: {question} A: {answer_a} Answer [[A]], [[B]] or [[C]].": "missing placeholder",
        "{question} {answer_a} {answer_b} {reference} [[A]] [[B]] [[C]]": "unknown placeholder",
        "{question} {answer_a} {answer_b} pick the better one": "must ask for the verdict",
        "{question} {answer_a} {answer_b} [[A]] [[B]] [[C]] a literal { brace": "brace",
        "{question!r} {answer_a} {answer_b} [[A]] [[B]] [[C]]": "format spec",
        "{} {question} {answer_a} {answer_b} [[A]] [[B]] [[C]]": "unknown placeholder",
    }
    for rubric, message in bad.items():
        with pytest.raises(FtxError, match=message):
            judge.check_rubric(rubric)
    system, user = judge.pair_messages("q {x}?", "a {y}", "b", rubric=good)
    assert system["content"] == judge.RUBRIC_SYSTEM and user["content"].startswith("Q: q {x}?\nA: a {y}\nB: b\n")
    with pytest.raises(FtxError, match="single-turn"):
        judge.pair_messages(["q1", "q2"], ["a1", "a2"], ["b1", "b2"], rubric=good)


def test_a_rubric_replaces_the_prompt_and_is_checked_before_any_call():
    rubric = "Question: {question}\n1: {answer_a}\n2: {answer_b}\nSay [[A]] if 1 is better, [[B]] if 2, [[C]] if tied."
    seen = []

    def shorter(messages):
        seen.append(messages)
        a, b = re.search(r"1: (.*)\n2: (.*)\n", messages[1]["content"]).groups()
        return "[[A]]" if len(a) < len(b) else "[[B]]" if len(b) < len(a) else "[[C]]"

    result = judge.judge_pairs(shorter, items(6, 6), rubric=rubric)
    s = result.summary
    assert s.prompt == "rubric" and (s.wins, s.losses) == (0, 6) and s.reliable and s.verdict == "model_1"
    assert all(m[0]["content"] == judge.RUBRIC_SYSTEM for m in seen)
    with pytest.raises(FtxError):
        judge.judge_pairs(pytest.fail, items(2, 1), rubric="{question} {answer_a} {answer_b}")


# ------------------------------------------------------------------ both orders and the checks
def test_a_position_biased_judge_is_all_ties_and_unreliable():
    s = judge.judge_pairs(always_a, items(10, 7)).summary
    assert (s.wins, s.ties, s.losses, s.inconsistent) == (0, 10, 0, 10)
    assert s.swap_consistency == 0 and s.position_bias == 1.0 and s.win_rate == 0.5
    assert s.identical_tie_rate == 0
    assert not s.reliable and s.verdict is None
    assert {"swap_consistency", "identical_tie"} <= set(s.failed_checks)
    assert "NOT RELIABLE, no winner named" in s.text and "swap_consistency" in s.text


def test_a_consistent_judge_preferring_longer_answers():
    result = judge.judge_pairs(longer, items(20, 15), names=("base", "tuned"))
    s = result.summary
    assert (s.pairs, s.n, s.wins, s.ties, s.losses, s.inconsistent, s.errors) == (20, 20, 15, 0, 5, 0, 0)
    assert s.win_rate == 0.75 and s.win_rate_ci[0] > 0.5
    assert s.swap_consistency == 1.0 and s.position_bias == 0.5 and s.identical_tie_rate == 1.0
    assert s.reliable and s.failed_checks == [] and s.verdict == "model_2" and s.text.endswith("tuned wins")
    first = result.judgements[0]
    assert [o.a for o in first.orders] == ["model_1", "model_2"]
    assert [o.verdict for o in first.orders] == ["B", "A"] and first.winner == "model_2" and first.consistent
    assert [c.name for c in s.checks] == ["identical_tie", "swap_consistency", "programmatic_agreement", "judge_errors"]
    assert next(c for c in s.checks if c.name == "programmatic_agreement").passed is None  # skipped, not failed


def test_identical_answers_must_tie():
    def longer_or_first(messages):  # consistent on different answers, but never calls a tie
        out = longer(messages)
        return "[[A]]" if out == "[[C]]" else out

    result = judge.judge_pairs(longer_or_first, items(8, 6), checks=judge.Checks(identical_pairs=3))
    identical = [j for j in result.judgements if j.kind == "identical"]
    assert [j.id for j in identical] == ["identical-0", "identical-1", "identical-2"]
    assert all(j.length_1 == j.length_2 for j in identical)
    s = result.summary
    assert s.swap_consistency == 1.0 and s.identical_tie_rate == 0.0
    assert s.failed_checks == ["identical_tie"] and s.verdict is None and s.pairs == 8  # identical pairs not counted


def test_agreement_with_a_programmatic_preference():
    pairs = items(8, 4)  # the longer judge: model 2 wins pairs 0-3, model 1 pairs 4-7; agreement on 6 of 8
    preferred = ["model_1", "model_2", "model_2", "model_2", "model_1", "model_1", "model_1", "model_2"]
    for p, pref in zip(pairs, preferred):
        p["preferred"] = pref
    pairs.append({**items(9, 9)[8], "preferred": "tie"})  # a programmatic tie is not decisive: not counted
    s = judge.judge_pairs(longer, pairs).summary
    assert s.programmatic_agreement == 0.75 and s.programmatic_n == 8 and s.reliable
    for p in pairs:
        p["preferred"] = {"model_1": "model_2", "model_2": "model_1", "tie": "tie"}[p["preferred"]]
    s = judge.judge_pairs(longer, pairs).summary
    assert s.programmatic_agreement == 0.25 and s.failed_checks == ["programmatic_agreement"] and s.verdict is None


def test_errors_are_counted_apart():
    def flaky(messages):
        a, _ = answers(messages)
        if "question 1?" in messages[1]["content"]:
            raise ConnectionError("judge down")
        return "no verdict here" if a == "x" * 41 else longer(messages)  # model 1's answer to question 3 as A

    result = judge.judge_pairs(flaky, items(20, 20))
    s = result.summary
    # errors: pair 1 (2 calls) and its identical pair (2), pair 3's first order (1) and its identical pair (2)
    assert (s.pairs, s.n, s.errors, s.error_judgements) == (20, 18, 2, 7)
    assert s.wins == 18 and s.win_rate == 1.0 and s.identical_tie_rate == 1.0
    failed_call = result.judgements[1].orders[0]
    assert failed_call.verdict == "error" and failed_call.error == "ConnectionError: judge down"
    assert s.failed_checks == ["judge_errors"] and s.verdict is None  # 7 of 48 calls > 0.1
    s = judge.judge_pairs(lambda m: "?", items(3, 1)).summary
    assert s.n == 0 and s.win_rate is None and s.verdict is None and "no pair judged" in s.text


# ------------------------------------------------------------------ length-controlled win rate
def length_pairs(n: int, share_2_longer: float, seed: int = 0):
    """n pairs whose model 2 answer is the longer one with probability `share_2_longer`, and a fake judge that
    prefers the longer answer only: with a probability growing with the length difference, the same in both
    orders (one uniform draw per question)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base, delta = rng.integers(300, 600, n), rng.integers(10, 250, n)
    sign, draw = np.where(rng.random(n) < share_2_longer, 1, -1), rng.random(n)
    pairs = [
        {
            "id": i,
            "question": f"q{i}",
            "answer_1": "a" * int(base[i]),
            "answer_2": "b" * int(base[i] + sign[i] * delta[i]),
        }
        for i in range(n)
    ]

    def length_judge(messages):
        a, b = answers(messages)
        if len(a) == len(b):
            return "[[C]]"
        p_longer = 0.5 + 0.45 * min(abs(len(a) - len(b)) / 150, 1.0)
        longer_wins = draw[int(messages[1]["content"].split("\n")[1][1:])] < p_longer
        return "[[A]]" if longer_wins == (len(a) > len(b)) else "[[B]]"

    return pairs, length_judge


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    pairs, length_judge = length_pairs(200, 0.75)
    s = judge.judge_pairs(length_judge, pairs).summary
    assert s.swap_consistency == 1.0 and s.win_rate > 0.62 and s.win_rate_ci[0] > 0.5
    assert abs(s.length_controlled_win_rate - 0.5) < 0.06 and s.length_coefficient > 1
    low, high = s.length_controlled_ci
    assert low < 0.5 < high and high - low < 0.3


def test_length_controlled_win_rate_keeps_a_quality_preference():
    def quality(messages):  # model 2's answers ("b...") are better on 3 of 4 pairs, whatever their length
        a, b = answers(messages)
        if a == b:
            return "[[C]]"
        question = messages[1]["content"].split("\n")[1]
        good_2 = int(question[1:]) % 4 != 0
        return "[[A]]" if (a.startswith("b") == good_2) else "[[B]]"

    pairs, _ = length_pairs(80, 0.5)
    s = judge.judge_pairs(quality, pairs).summary
    assert s.win_rate == 0.75 and abs(s.length_controlled_win_rate - s.win_rate) < 0.05


def test_length_controlled_needs_both_signs():
    assert judge.length_controlled([5, 10, 20] * 5, [1.0] * 15)["win_rate"] is None  # model 2 always longer
    assert judge.length_controlled([5, -10], [1.0, 0.0])["win_rate"] is None  # too few pairs
    fit = judge.length_controlled([10, -10] * 10, [1.0, 0.0] * 10)
    assert abs(fit["win_rate"] - 0.5) < 1e-6 and fit["coefficient"] > 1


# ------------------------------------------------------------------ output, concurrency, client
def test_results_serialize_and_raw_judgements_go_to_jsonl(tmp_path):
    result = judge.judge_pairs(longer, items(5, 3))
    back = judge.JudgeResult.model_validate_json(result.model_dump_json())
    assert back == result and json.loads(result.summary.model_dump_json())["verdict"] == "no_difference"  # 3 of 5
    path = judge.write_jsonl(tmp_path / "out" / "judgements.jsonl", result)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5 + 4 and rows[0]["orders"][0]["output"] == "[[B]]" and rows[-1]["kind"] == "identical"


def test_concurrency_keeps_the_order():
    import time

    def slow_longer(messages):
        time.sleep(0.001 * (len(messages[1]["content"]) % 7))
        return longer(messages)

    slow_longer.concurrency = 4
    parallel = judge.judge_pairs(slow_longer, items(12, 8))
    serial = judge.judge_pairs(slow_longer, items(12, 8), concurrency=1)
    assert parallel == serial


def test_multi_turn_items_use_the_multi_turn_prompt():
    seen = []
    pair = {"question": ["q1", "q2"], "answer_1": ["a1", "a2"], "answer_2": ["b1", "b2 longer"]}
    s = judge.judge_pairs(lambda m: seen.append(m) or "[[C]]", [pair]).summary
    assert s.prompt == "pair-v2-multi-turn" and s.ties == 1 and "### Assistant A:\nb2 longer" in seen[1][1]["content"]
    with pytest.raises(ValueError):
        judge.PairItem(question=["q1", "q2"], answer_1="a", answer_2=["b1", "b2"])


def test_token_f1_preference():
    pytest.importorskip("regex")
    assert judge.token_f1_preference("Paris is the capital", "It is Lyon", "Paris") == "model_1"
    assert judge.prefer(0.5, 0.52, margin=0.05) == "tie" and judge.prefer(0.1, 0.9) == "model_2"


def test_openai_judge_sends_a_greedy_chat_completion():
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, self.headers["Authorization"], body))
            reply = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok [[B]]"}}
                    ],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fn = judge.openai_judge(f"http://127.0.0.1:{server.server_port}/v1", "key-1", "judge-model", concurrency=3)
        assert fn.concurrency == 3 and fn.model == "judge-model"
        assert fn(judge.pair_messages("q", "a", "b")) == "ok [[B]]"
    finally:
        server.shutdown()
    path, auth, body = requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer key-1"
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 512
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
