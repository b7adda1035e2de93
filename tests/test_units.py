"""Pure-logic unit tests: data validation, splitting, Modelfile helpers (bench: test_bench_units.py)."""

import json

import pytest

from ftx.core import rows as datarows
from ftx.core import splits
from ftx.core.errors import FtxError
from ftx.stages import data as stage


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


@pytest.mark.parametrize(
    "bad, problem",
    [
        ('{"messages": [1, 2', "invalid JSON"),
        (
            json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
            "messages[0].role: unknown role 'robot'",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}),
            "messages[1].content: empty response",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "x"},
                        {"role": "user", "content": "y"},
                        {"role": "assistant", "content": "z"},
                    ]
                }
            ),
            "messages[1].role: turns must alternate user/assistant: expected assistant, got user",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "last turn must be from the assistant"),
        (json.dumps({"prompt": "x"}), "messages: must be a non-empty list"),  # the file's format is chat
        ("[1, 2]", "row: must be an object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, bad, problem):
    p = write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(FtxError) as e:
        datarows.load_rows(p)
    assert str(e.value).startswith(f"{p}:3: ")
    assert problem in str(e.value)


def test_prompt_completion_rows_become_chat(tmp_path):
    p = write(tmp_path, [json.dumps({"prompt": "2+2?", "completion": "4"})])
    assert datarows.load_rows(p) == [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]


def test_split_is_seeded_disjoint_and_complete():
    rows = [[{"role": "user", "content": str(i)}] for i in range(100)]
    tr, va, te = splits.split(rows, 0.1, 0.1, seed=3)
    assert (tr, va, te) == splits.split(rows, 0.1, 0.1, seed=3) and (len(tr), len(va), len(te)) == (80, 10, 10)
    assert sorted(r[0]["content"] for r in tr + va + te) == sorted(str(i) for i in range(100))
    assert splits.split(rows, 0.1, 0.1, seed=4)[1] != va
    with pytest.raises(FtxError):
        splits.split(rows[:3], 0.5, 0.5)


def test_data_stage_writes_nothing_when_input_is_bad(tmp_path):
    good = write(tmp_path, [GOOD] * 10, "good.jsonl")
    bad = write(tmp_path, [GOOD, "{oops"], "bad.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FtxError):
        stage.run(stage.DataConfig(path=good, heldout=bad), out)
    assert list(out.iterdir()) == []
