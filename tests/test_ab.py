"""`ftx eval ab` input checks (pure logic: the sides and prompts it accepts; the real comparison is an
end-to-end test in test_e2e_serve.py)."""

import json

import pytest

from ftx.ab import ABJob, load_prompts, parse_side, summary_md
from ftx.core.errors import FtxError


def test_sides_are_endpoints_gguf_files_or_recipe_runs(tmp_path):
    s = parse_side("api=https://api.example.com/v1@gpt-x", "a")
    assert (s.url, s.model, s.gguf) == ("https://api.example.com/v1", "gpt-x", None)
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert parse_side(f"q={g}", "b").gguf == g
    run = tmp_path / "run"
    (run / "stages" / "export").mkdir(parents=True)
    (run / "stages" / "export" / "model-q4_k_m.gguf").write_bytes(b"GGUF")
    card = {"export": {"selected": "q4_k_m", "files": [{"name": "q4_k_m", "file": "model-q4_k_m.gguf"}]}}
    (run / "run_card.json").write_text(json.dumps(card))
    assert parse_side(f"tuned={run}", "b").gguf == run / "stages" / "export" / "model-q4_k_m.gguf"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-name", "expected NAME=SOURCE"),
        ("x=https://host/v1", "an endpoint is URL@MODEL"),
        ("x=/nowhere/m.gguf", "GGUF not found"),
        ("x=/tmp", "neither a .gguf file nor a recipe run directory"),
    ],
)
def test_bad_sides_get_one_line_errors(spec, message):
    with pytest.raises(FtxError, match=message):
        parse_side(spec, "a")


def test_a_run_that_stopped_before_export_is_refused(tmp_path):
    (tmp_path / "run_card.json").write_text(json.dumps({"eval": {}}))
    with pytest.raises(FtxError, match="has no exported GGUF"):
        parse_side(f"x={tmp_path}", "b")


def test_prompts_from_mtbench_or_a_chat_file(tmp_path):
    prompts, refs, ids = load_prompts(ABJob(a="a=x", b="b=y", limit=8))
    assert len(prompts) == 8 and refs is None and len(set(ids)) == 8
    f = tmp_path / "chat.jsonl"
    f.write_text(
        json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n"
    )
    prompts, refs, _ = load_prompts(ABJob(a="a=x", b="b=y", prompts=str(f)))
    assert prompts == [[{"role": "user", "content": "2+2?"}]] and refs == ["4"]
    with pytest.raises(FtxError, match="file not found"):
        load_prompts(ABJob(a="a=x", b="b=y", prompts=str(tmp_path / "none.jsonl")))


def test_summary_lists_the_most_different_answers_first():
    rows = [
        {"prompt": "p1", "a": "same", "b": "same", "difference": 0.0},
        {"prompt": "p2", "a": "x | y", "b": "z", "difference": 1.0},
    ]
    s = {"n": 2, "prompts": "f", "max_tokens": 8, "metrics": {}, "identical": 0.5, "mean_difference": 0.5}
    md = summary_md({**s, "judge": None}, rows, "a", "b")
    assert md.index("| p2 | x \\| y | z |") < md.index("| p1 | same | same |")
