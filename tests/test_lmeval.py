"""ftx.lmeval: lm-evaluation-harness on ftx's packaged tasks (src/ftx/resources/lmeval), in-process (lm-eval's hf
model) and against llama-server (local-chat-completions). The unit tests need only lm-eval and the task files; the
e2e tests run the quickstart's base model (the packaged SmolLM2 GGUF, converted once) and a llama-server."""

import json
import socket
from pathlib import Path

import pytest

from ftx.core.cache import sha256_file
from ftx.core.errors import FtxError

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["ftx_quickstart_gen", "ftx_quickstart_mc"]
CATEGORIES = ["math", "geography", "language", "units"]


def derived_rows(source: Path) -> list[dict]:
    """The packaged task data as the README says it is made from the quickstart's held-out chat rows."""
    rows = []
    for i, line in enumerate(source.read_text().splitlines()):
        messages = json.loads(line)["messages"]
        reference = messages[-1]["content"]
        obj = json.loads(reference)
        rows.append(
            {
                "id": i,
                "question": messages[0]["content"],
                "category": obj["category"],
                "label": CATEGORIES.index(obj["category"]),
                "answer": obj["answer"],
                "reference": reference,
            }
        )
    return rows


def test_packaged_task_data_is_the_quickstart_heldout_split():
    from ftx import lmeval

    packaged = [json.loads(x) for x in (lmeval.task_dir() / "quickstart_heldout.jsonl").read_text().splitlines()]
    assert packaged == derived_rows(ROOT / "recipes" / "data" / "quickstart_heldout.jsonl")
    assert set(lmeval.packaged_tasks()) == set(TASKS)


def test_tasks_load_from_the_package_with_local_data_and_filters_score_the_references_as_correct(tmp_path, monkeypatch):
    from lm_eval.filters.extraction import RegexFilter

    from ftx import lmeval

    monkeypatch.chdir(tmp_path)  # data_files are relative to the YAML, not to the working directory
    _, loaded, sources = lmeval.load_tasks(TASKS)
    assert lmeval.output_types(loaded) == {
        "ftx_quickstart_gen": "generate_until",
        "ftx_quickstart_mc": "multiple_choice",
    }
    data = lmeval.task_dir() / "quickstart_heldout.jsonl"
    for name in TASKS:
        task = loaded["tasks"][name]
        assert len(task.eval_docs) == 24
        assert sources[name]["data"] == {str(data.resolve()): sha256_file(data)}
    gen, mc = loaded["tasks"]["ftx_quickstart_gen"], loaded["tasks"]["ftx_quickstart_mc"]
    docs = list(gen.eval_docs)
    # a model that answers exactly the reference passes both filters; the base model's prose passes neither
    for f in gen.config.filter_list:
        regex = next(step for step in f["filter"] if step["function"] == "regex")
        flt = RegexFilter(regex_pattern=regex["regex_pattern"])
        got = flt.apply([[d["reference"]] for d in docs], docs)
        assert [g[0] for g in got] == [gen.doc_to_target(d) for d in docs], f["name"]
        assert flt.apply([['The antonym of "inside" is "outside".']], docs[:1]) == [["[invalid]"]]
    assert all(mc.doc_to_choice(d)[mc.doc_to_target(d)] == d["category"] for d in mc.eval_docs)

    # a task YAML given by path, its data next to it, from another working directory
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "d.jsonl").write_text(data.read_text())
    yaml_text = (lmeval.task_dir() / "ftx_quickstart_gen.yaml").read_text()
    (tmp_path / "t" / "mine.yaml").write_text(
        yaml_text.replace("task: ftx_quickstart_gen", "task: mine").replace("quickstart_heldout.jsonl", "d.jsonl")
    )
    _, loaded, sources = lmeval.load_tasks([str(tmp_path / "t" / "mine.yaml")])
    assert len(loaded["tasks"]["mine"].eval_docs) == 24 and str(tmp_path / "t" / "d.jsonl") in sources["mine"]["data"]
    (tmp_path / "t" / "d.jsonl").unlink()
    with pytest.raises(FtxError, match="data file not found"):
        lmeval.load_tasks([str(tmp_path / "t" / "mine.yaml")])


def test_an_endpoint_refuses_loglikelihood_tasks_before_any_request():
    from ftx import lmeval

    with socket.socket() as srv:  # a listener that would see any connection attempt
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.setblocking(False)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/v1"
        with pytest.raises(FtxError) as err:
            lmeval.run(TASKS, "m", endpoint=url, api_key="k", limit=2)
        with pytest.raises(BlockingIOError):
            srv.accept()
    msg = str(err.value)
    assert "\n" not in msg and "ftx_quickstart_mc (multiple_choice)" in msg and "ftx_quickstart_gen" not in msg
    assert "log-likelihood" in msg and "in-process" in msg


def test_chat_url_and_argument_checks():
    from ftx import lmeval

    full = "http://h:1/v1/chat/completions"
    assert lmeval.chat_url("http://h:1/v1") == full
    assert lmeval.chat_url("http://h:1/v1/") == full
    assert lmeval.chat_url("http://h:1") == full
    assert lmeval.chat_url(full) == full
    with pytest.raises(FtxError, match="limit"):
        lmeval.run(TASKS, "m", limit=0)
    with pytest.raises(FtxError, match="batch_size"):
        lmeval.run(TASKS, "m", batch_size=0)
    with pytest.raises(FtxError, match="adapter"):
        lmeval.run(TASKS, "m", endpoint="http://h:1/v1", adapter=Path("a"))


# ------------------------------------------------------------------------------------------------ end to end


def _check_metric(m: dict) -> None:
    assert 0.0 <= m["value"] <= 1.0
    assert m["stderr"] is not None and 0.0 <= m["stderr"] <= 0.5


def _samples(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.e2e
def test_lmeval_in_process_on_the_base_model_with_and_without_an_adapter(tmp_path):
    from ftx import lmeval
    from ftx.core.basemodel import resolve

    base = resolve("smollm2-135m-instruct")
    out = tmp_path / "base.json"
    r = lmeval.run(TASKS, base, limit=6, batch_size=4, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r, default=str))
    assert r["lm_eval"] == "0.4.13" and r["config"]["model_args"] == {
        "pretrained": str(base),
        "dtype": "float32",
        "device": "cpu",
    }
    assert r["config"]["apply_chat_template"] and len(r["config"]["chat_template"]["sha256"]) == 64
    gen, mc = r["tasks"]["ftx_quickstart_gen"], r["tasks"]["ftx_quickstart_mc"]
    assert gen["n"] == mc["n"] == 6 and gen["n_documents"] == mc["n_documents"] == 24
    assert set(gen["metrics"]) == {"exact_match,strict", "exact_match,answer-field"}
    assert set(mc["metrics"]) == {"acc,none", "acc_norm,none"}
    for m in [*gen["metrics"].values(), *mc["metrics"].values()]:
        _check_metric(m)

    # the figures are what the samples say: accuracy = argmax of the choices' log-likelihoods; exact match per filter
    samples = _samples(out.with_name("base.samples.jsonl"))
    mc_rows = [s for s in samples if s["task"] == "ftx_quickstart_mc"]
    assert len(mc_rows) == 6
    right = [max(range(4), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in mc_rows]
    assert mc["metrics"]["acc,none"]["value"] == pytest.approx(sum(right) / 6)
    gen_rows = [s for s in samples if s["task"] == "ftx_quickstart_gen"]
    assert sorted({s["filter"] for s in gen_rows}) == ["answer-field", "strict"] and len(gen_rows) == 12
    assert all(s["resps"][0][0].strip() for s in gen_rows)  # the model answered
    for flt in ("strict", "answer-field"):
        rows = [s for s in gen_rows if s["filter"] == flt]
        assert gen["metrics"][f"exact_match,{flt}"]["value"] == pytest.approx(sum(s["exact_match"] for s in rows) / 6)

    # a peft adapter (random LoRA weights, so it changes the model): lm-eval's hf model loads it
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    out2 = tmp_path / "adapter.json"
    r2 = lmeval.run(["ftx_quickstart_mc"], base, adapter=tmp_path / "adapter", limit=2, out=out2)
    assert r2["config"]["model_args"]["peft"] == str((tmp_path / "adapter").resolve())
    assert r2["tasks"]["ftx_quickstart_mc"]["n"] == 2
    with_adapter = [s["resps"] for s in _samples(out2.with_name("adapter.samples.jsonl"))]
    assert with_adapter != [s["resps"] for s in mc_rows[:2]]


@pytest.mark.e2e
def test_lmeval_generation_task_against_llama_server(tmp_path):
    from ftx import lmeval, serving
    from ftx.core.basemodel import packaged_gguf

    gguf = packaged_gguf("smollm2-135m-instruct")
    log = tmp_path / "server.log"
    with serving.start(serving.ServeSettings(), gguf, "m", log, raw=True) as ep:
        with pytest.raises(FtxError, match="log-likelihood"):
            lmeval.run(TASKS, gguf, endpoint=ep.base_url, model_name="m", api_key=ep.api_key)
        out = tmp_path / "served.json"
        r = lmeval.run(
            ["ftx_quickstart_gen"], gguf, endpoint=ep.base_url, model_name="m", api_key=ep.api_key, limit=6, out=out
        )
    cfg = r["config"]
    assert (
        cfg["type"] == "local-chat-completions" and cfg["model_args"]["base_url"] == ep.base_url + "/chat/completions"
    )
    assert cfg["chat_template"] == {"applied_by": "server"} and ep.api_key not in out.read_text()
    gen = r["tasks"]["ftx_quickstart_gen"]
    assert gen["n"] == 6 and gen["output_type"] == "generate_until"
    for m in gen["metrics"].values():
        _check_metric(m)
    samples = _samples(out.with_name("served.samples.jsonl"))
    assert len(samples) == 12 and all(s["resps"][0][0].strip() for s in samples)  # llama-server answered each
    ctx = samples[0]["arguments"][0][0]  # the chat messages as JSON (lm-eval's JsonChatStr)
    ctx = ctx[0] if isinstance(ctx, list) else ctx
    assert json.loads(ctx) == [{"role": "user", "content": samples[0]["doc"]["question"]}]


def test_cli_refuses_a_log_likelihood_task_on_an_endpoint_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ftx.cli", "eval", "lm-eval", "--tasks", "ftx_quickstart_mc,ftx_quickstart_gen"]
        + ["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and not (tmp_path / "r.json").exists()
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "ftx_quickstart_mc" in err[0] and "log-likelihood" in err[0], proc.stderr[-2000:]
