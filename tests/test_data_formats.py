"""Data layer: every row format and file type, skip/fail policy, dedupe, leakage check, label masks."""

import csv
import json
import re

import pytest

from ftx.core import chat, splits
from ftx.core import rows as datarows
from ftx.core.errors import FtxError
from ftx.stages import data as stage

CHAT = {
    "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
}
EXPECTED_CHAT = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
]


def jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


@pytest.mark.parametrize(
    "row, fmt, expected",
    [
        (CHAT, "chat", {"messages": EXPECTED_CHAT}),
        (
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            "alpaca",
            {"messages": [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]},
        ),
        (
            {"instruction": "Say hi", "input": "", "output": "hi"},
            "alpaca",
            {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        ),
        (
            {"prompt": "2+2?", "completion": "4"},
            "completion",
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        ),
        ({"text": "Once upon a time."}, "text", {"text": "Once upon a time."}),
        (
            {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
            "preference",
            {"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris", "rejected": "Rome"},
        ),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
            },
            "preference",
            {"prompt": [{"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"},
        ),
    ],
)
def test_formats_are_detected_and_normalized(tmp_path, row, fmt, expected):
    examples, report = datarows.load(jsonl(tmp_path, [row, row]))
    assert report.format == fmt and examples == [expected, expected]


def test_explicit_format_overrides_detection(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "a", "completion": "b", "text": "ignored"}])
    assert datarows.load(p, fmt="completion")[1].format == "completion"
    with pytest.raises(FtxError, match=r"d.jsonl:1: text: missing"):
        datarows.load(jsonl(tmp_path, [{"prompt": "a", "completion": "b"}]), fmt="text")


def test_file_types(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "output"])
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    results = {s: datarows.load(tmp_path / f"d.{s}")[0] for s in ("json", "csv", "parquet")}
    assert results["json"] == results["csv"] == results["parquet"] == datarows.load(jsonl(tmp_path, rows))[0]
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(FtxError, match="unsupported file type"):
        datarows.load(tmp_path / "d.txt")


def test_csv_errors_name_the_csv_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion\nhi,there\nempty,\n")
    with pytest.raises(FtxError, match=rf"^{p}:3: completion: empty$"):
        datarows.load(p)


def test_skip_policy_drops_and_counts(tmp_path):
    bad_role = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    empty = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}
    p = jsonl(tmp_path, [CHAT, "{broken", bad_role, CHAT, empty, empty])
    examples, report = datarows.load(p, on_error="skip")
    assert len(examples) == 2 and report.rows_read == 6 and report.rows_kept == 2
    assert report.dropped == {"json: invalid JSON": 1, "messages: unknown role": 1, "messages: empty response": 2}
    assert report.problems[0].startswith(f"{p}:2: json: invalid JSON")
    with pytest.raises(FtxError, match=rf"^{p}:2: json: invalid JSON"):
        datarows.load(p, on_error="fail")


def test_dedupe_exact_and_normalized():
    a = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    b = {"messages": [{"role": "user", "content": "what  is 2+2? "}, {"role": "assistant", "content": "4"}]}
    c = {"messages": [{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "6"}]}
    kept, counts = splits.dedupe([a, a, b, c])
    assert kept == [a, c] and counts == {"exact": 1, "normalized": 1}


def test_leakage_across_splits_is_removed():
    def ex(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    train = [ex("Capital of France?", "Paris")]
    val = [ex("capital of  France?", "It is Paris"), ex("Capital of Peru?", "Lima")]
    test = [ex("Capital of Peru?", "Lima!")]
    (val2, test2), removed, near = splits.remove_leakage(train, val, test)
    assert val2 == [val[1]] and test2 == [] and (removed, near) == (2, 0)


def test_near_duplicate_prompts_across_splits_are_removed():
    def ex(q):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}

    long_q = "Summarize the following report about quarterly revenue growth in the northern region for the board"
    train = [ex(long_q), ex("What is 17 + 25?")]
    val = [
        ex(long_q.replace("the board", "the board please")),  # one word added: near duplicate
        ex("What is 18 + 25?"),  # same template, different question: kept
        ex("Translate 'good morning' into French"),
    ]
    (val2,), exact, near = splits.remove_leakage(train, val, near_dup_threshold=0.8)
    assert val2 == val[1:] and (exact, near) == (0, 1)
    (val3,), _, near_off = splits.remove_leakage(train, val)  # off by default in the function
    assert val3 == val and near_off == 0
    sim = splits.jaccard(splits.shingles(long_q), splits.shingles(long_q + " please"))
    assert 0.8 < sim < 1


def test_data_stage_reports_and_writes_splits(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(50)] + [{"prompt": "q0", "completion": "a0"}]
    cfg = stage.DataConfig(path=jsonl(tmp_path, rows), val_fraction=0.1, test_fraction=0.1, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    r = stage.run(cfg, out)
    assert (r.train_rows, r.val_rows, r.test_rows) == (40, 5, 5) and r.duplicates_removed["exact"] == 1
    prompts = [
        {json.dumps(e["messages"][0]) for e in chat.read_examples(out / f"{s}.jsonl")} for s in ("train", "val", "test")
    ]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from ftx.core import basemodel

    return AutoTokenizer.from_pretrained(basemodel.resolve("smollm2-135m-instruct"))


def test_label_mask_is_exactly_the_assistant_turns(smollm_tokenizer):
    tok = smollm_tokenizer
    msgs = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, 42 times."},
    ]
    r = chat.render(tok, msgs, 4096)
    assert r["input_ids"] == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    spans, cur = [], []
    for tid, lab in zip(r["input_ids"], r["labels"]):
        if lab != -100:
            assert lab == tid
            cur.append(tid)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tok.decode(s) for s in spans] == ["Blue.<|im_end|>\n", "Green, 42 times.<|im_end|>\n"]


def test_text_rows_train_on_every_token(smollm_tokenizer):
    r = chat.render_example(smollm_tokenizer, {"text": "Plain text for pretraining."}, 512)
    assert r["labels"] == r["input_ids"] and r["input_ids"][-1] == smollm_tokenizer.eos_token_id
    with pytest.raises(FtxError, match="for the dpo stage"):
        chat.render_example(smollm_tokenizer, {"prompt": [], "chosen": "a", "rejected": "b"}, 512)


def test_cli_data_validate_split_inspect(tmp_path):
    import subprocess

    from .conftest import FTX

    bad = jsonl(tmp_path, [CHAT, "{nope", {"messages": [{"role": "user", "content": "x"}]}, CHAT])
    proc = subprocess.run([*FTX, "data", "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"{bad}:2: json: invalid JSON" in proc.stderr and f"{bad}:3: messages: last turn" in proc.stderr
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]
    src = jsonl(tmp_path, rows, "alpaca.jsonl")
    proc = subprocess.run(
        [*FTX, "data", "split", str(src), "--out", str(tmp_path / "split")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    counts = [len(chat.read_examples(tmp_path / "split" / f"{s}.jsonl")) for s in ("train", "val", "test")]
    assert counts == [24, 3, 3]
    png = tmp_path / "len.png"
    proc = subprocess.run(
        [*FTX, "data", "inspect", str(src), "--png", str(png)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "tokens per row" in proc.stderr and png.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ data as it comes from the wild
ROWS = [{"instruction": "Name a café.", "output": "Café Crème"}, {"instruction": "Größe?", "output": "groß"}]


def _csv(path, rows, encoding, bom=False):
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["instruction", "output"])
    w.writeheader()
    w.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode(encoding))
    return path


def test_a_latin1_file_is_one_error_with_line_and_offset_and_reads_with_its_encoding(tmp_path):
    from ftx.core.rows import Options

    for name in ("d.jsonl", "d.csv"):
        p = tmp_path / name
        if name.endswith(".jsonl"):
            p.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS).encode("latin-1"))
        else:
            _csv(p, ROWS, "latin-1")
        with pytest.raises(FtxError) as e:
            datarows.load(p)
        msg = str(e.value)
        assert re.fullmatch(
            rf"{re.escape(str(p))}:[12]: not valid utf-8: byte 0x[0-9a-f]{{2}} at offset \d+; save the "
            r"file as UTF-8, or set data.encoding .*",
            msg,
        ), msg
        examples, _ = datarows.load(p, options=Options(encoding="latin-1"))
        assert (
            examples[0]["messages"][0]["content"] == "Name a café." and examples[1]["messages"][1]["content"] == "groß"
        )


def test_a_bom_is_skipped_and_utf16_is_named(tmp_path):
    p = _csv(tmp_path / "excel.csv", ROWS, "utf-8", bom=True)  # what spreadsheets write for "CSV UTF-8"
    examples, report = datarows.load(p)
    assert report.format == "alpaca" and len(examples) == 2
    j = tmp_path / "bom.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROWS[0]) + "\n").encode())
    assert datarows.load(j)[1].format == "alpaca"
    u = tmp_path / "u16.jsonl"
    u.write_bytes((json.dumps(ROWS[0]) + "\n").encode("utf-16"))
    with pytest.raises(FtxError, match=r"u16\.jsonl:1: the file is UTF-16 .* data.encoding: utf-16"):
        datarows.load(u)
    from ftx.core.rows import Options

    assert datarows.load(u, options=Options(encoding="utf-16"))[1].rows_kept == 1


def test_a_broken_parquet_file_is_one_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "junk.parquet").write_text("not parquet at all")
    for p in (cut, tmp_path / "junk.parquet"):
        with pytest.raises(FtxError, match=rf"{re.escape(str(p))}: not a readable Parquet file \("):
            datarows.load(p)


def test_sharegpt_rows_are_detected_and_mapped(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "Be terse."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
        ]
    }
    examples, report = datarows.load(jsonl(tmp_path, [row]))
    assert report.format == "sharegpt" and examples == [
        {
            "messages": EXPECTED_CHAT[:1]
            + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
        }
    ]
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "observation", "value": "{}"}]}
    with pytest.raises(FtxError, match=r"d.jsonl:2: conversations\[1\].from: unknown speaker 'observation'"):
        datarows.load(jsonl(tmp_path, [row, bad]))
    twice = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    with pytest.raises(FtxError, match=r"conversations\[1\].from: turns must alternate"):
        datarows.load(jsonl(tmp_path, [twice]))


def test_openai_weights_are_kept_and_checked(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "final", "weight": 1},
        ]
    }
    examples, _ = datarows.load(jsonl(tmp_path, [row]))
    assert [m.get("weight") for m in examples[0]["messages"]] == [None, 0, None, 1]
    for bad, problem in (
        ({"role": "user", "content": "x", "weight": 1}, "messages[0].weight"),
        ({"role": "assistant", "content": "x", "weight": 0.5}, "messages[1].weight"),
    ):
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        msgs[0 if bad["role"] == "user" else 1] = bad
        with pytest.raises(FtxError, match=re.escape(problem)):
            datarows.load(jsonl(tmp_path, [{"messages": msgs}]))
    none = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    with pytest.raises(FtxError, match="every assistant turn has weight 0"):
        datarows.load(jsonl(tmp_path, [none]))


def test_weight_zero_turns_are_not_trained_on(smollm_tokenizer):
    tok = smollm_tokenizer
    msgs = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue.", "weight": 0},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green.", "weight": 1},
    ]
    r = chat.render(tok, msgs, 4096)
    trained = tok.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100])
    assert trained == "Green.<|im_end|>\n"  # the weight-0 reply is context only
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    assert r["input_ids"] == chat.render(tok, plain, 4096)["input_ids"]  # the weight never reaches the template


def test_alpaca_input_join_is_a_setting(tmp_path):
    from ftx.core.rows import Options

    p = jsonl(tmp_path, [{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    assert datarows.load(p)[0][0]["messages"][0]["content"] == "Add\n\n2 and 3"  # the default
    opts = Options(alpaca_template="### Instruction:\n{instruction}\n### Input:\n{input}")
    assert (
        datarows.load(p, options=opts)[0][0]["messages"][0]["content"] == "### Instruction:\nAdd\n### Input:\n2 and 3"
    )
    with pytest.raises(ValueError, match=r"must contain \{instruction\} and \{input\}"):
        stage.DataConfig(path=p, alpaca_template="{instruction} only")


def test_bench_prompts_read_every_row_format_and_file_type(tmp_path):
    from ftx.bench.prompts import from_file

    assert from_file(_csv(tmp_path / "a.csv", ROWS, "utf-8", bom=True)) == [
        [{"role": "user", "content": "Name a café."}],
        [{"role": "user", "content": "Größe?"}],
    ]
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    assert from_file(jsonl(tmp_path, [sharegpt])) == [[{"role": "user", "content": "Hi"}]]
    assert from_file(jsonl(tmp_path, [{"prompt": "only a prompt"}], "p.jsonl")) == ["only a prompt"]  # vllm custom
    assert from_file(jsonl(tmp_path, [{"text": "plain"}], "t.jsonl")) == ["plain"]


def test_cli_data_convert_writes_chat_rows(tmp_path):
    import subprocess

    from .conftest import FTX

    src = jsonl(tmp_path, [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    proc = subprocess.run(
        [*FTX, "data", "convert", str(src), "--to", "chat", "--out", str(tmp_path / "c.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "c.jsonl").read_text()) == {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    }
    text = jsonl(tmp_path, [{"text": "plain"}], "t.jsonl")
    proc = subprocess.run(
        [*FTX, "data", "convert", str(text), "--out", str(tmp_path / "x.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "text rows are not conversations" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()
