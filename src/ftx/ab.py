"""`ftx eval ab`: two models answer the same prompts with the same chat template and decoding (greedy, the same
token limit), side by side. Each side is an OpenAI-compatible endpoint (a hosted API, an `ftx serve`), a GGUF
file or a recipe run (its selected GGUF), which ftx serves on llama-server (127.0.0.1, a random key) for the
comparison: the engine applies the model's own chat template, so both sides are prompted the same way.

What comes out (in `out`, written whole or not at all):
    summary.md / summary.json   the metrics of both sides with 95% intervals and paired differences (where the
                                prompts carry reference answers), the share of identical answers, the judge's
                                summary with its sanity checks, the prompts where the answers differ most
    answers.jsonl               every prompt, reference, both answers and their scores
    judge.jsonl                 the judge's raw verdicts, both orders (when a judge is configured)
    report.html                 the same side by side, most different first
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from pydantic import BaseModel, ConfigDict, Field

from .core.config import OutputDir
from .core.errors import FtxError
from .judge import JudgeConfig


class ABJob(BaseModel):
    """`ftx eval ab`: the two sides, the prompts, the decoding, the judge, where the report goes."""

    model_config = ConfigDict(extra="forbid")
    a: str = Field(
        description="side A as NAME=SOURCE; SOURCE: URL@MODEL (an OpenAI-compatible endpoint; key $FTX_API_KEY_<NAME>, "
        "else $FTX_API_KEY), a .gguf file, or a recipe run directory (its selected GGUF)"
    )
    b: str = Field(description="side B, like a (differences and win rates are B's against A)")
    prompts: str = Field(
        "mtbench",
        description="mtbench (MT-Bench first-turn questions, stratified by category), or a chat JSONL file whose "
        "last assistant turn is each prompt's reference answer",
    )
    limit: int = Field(16, ge=1, description="prompts answered by each side")
    max_tokens: int = Field(128, ge=1, description="greedy tokens per answer, the same for both sides")
    concurrency: int = Field(4, ge=1, description="requests in flight per side (and llama-server slots)")
    judge: JudgeConfig | None = Field(
        None, description="a pairwise judge of B vs A (judge.endpoint or judge.gguf: there is no base model here)"
    )
    out: OutputDir = Field(OutputDir("ab"), description="the report directory (replaced whole)")


@dataclass
class Side:
    name: str
    source: str
    url: str | None = None  # an endpoint
    model: str | None = None
    gguf: Path | None = None  # a file ftx serves


def parse_side(spec: str, key: str) -> Side:
    """NAME=SOURCE -> Side; a one-line error naming the key otherwise."""
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
        raise FtxError(f"{key}: {spec!r}: expected NAME=SOURCE (URL@MODEL, a .gguf file or a recipe run directory)")
    if "://" in source:
        url, at, model = source.rpartition("@")
        if not at or not url or not model:
            raise FtxError(f"{key}: {source!r}: an endpoint is URL@MODEL, e.g. http://127.0.0.1:8080/v1@my-model")
        return Side(name, source, url=url, model=model)
    path = Path(source).expanduser().absolute()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FtxError(f"{key}: GGUF not found: {path}")
        return Side(name, source, gguf=path)
    if (path / "run_card.json").is_file():
        return Side(name, source, gguf=selected_gguf(path, key))
    raise FtxError(f"{key}: {path} is neither a .gguf file nor a recipe run directory (no run_card.json)")


def selected_gguf(run_dir: Path, key: str) -> Path:
    """The GGUF a recipe run's export stage selected (the one its serve stage serves)."""
    import json

    ex = json.loads((run_dir / "run_card.json").read_text()).get("export")
    if not ex or not ex.get("selected"):
        raise FtxError(f"{key}: run {run_dir} has no exported GGUF (its recipe stopped before export)")
    file = next(f["file"] for f in ex["files"] if f["name"] == ex["selected"])
    for candidate in (run_dir / file, run_dir / "stages" / "export" / file):
        if candidate.is_file():
            return candidate
    raise FtxError(f"{key}: {file} (selected by the export of {run_dir}) is missing")


def load_prompts(job: ABJob) -> tuple[list[list[dict]], list[str] | None, list[str]]:
    """(chat prompts, reference answers or None, ids)."""
    from .core import chat

    if job.prompts == "mtbench":
        from . import judge

        qs = judge.questions(job.limit)
        return [[{"role": "user", "content": q["turns"][0]}] for q in qs], None, [str(q["question_id"]) for q in qs]
    path = Path(job.prompts).expanduser()
    if not path.is_file():
        raise FtxError(f"prompts: file not found: {path} (or `mtbench`)")
    prompts, refs = chat.split_answers(chat.read_split(path)[: job.limit])
    if not prompts:
        raise FtxError(f"prompts: {path} holds no chat conversation ending in an assistant answer")
    return prompts, refs, [str(i) for i in range(len(prompts))]


@contextlib.contextmanager
def open_side(side: Side, job: ABJob, log: Path):
    """An endpoint for the side: the configured one, or its GGUF on llama-server for as long as the context lasts."""
    import os

    if side.url:
        key = os.environ.get(f"FTX_API_KEY_{side.name.upper().replace('-', '_')}") or os.environ.get("FTX_API_KEY")
        yield SimpleNamespace(base_url=side.url, api_key=key or "none", model=side.model)
        return
    from . import serving

    settings = serving.ServeSettings()
    settings.llamacpp.parallel = job.concurrency
    with serving.start(settings, side.gguf, side.name, log, raw=True) as ep:
        yield ep


def answer(ep, prompts: list[list[dict]], max_tokens: int, concurrency: int) -> list:
    """Greedy answers to every prompt through the endpoint, `concurrency` at a time, in prompt order."""
    from concurrent.futures import ThreadPoolExecutor

    from .serving import chat

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: chat(ep, p, max_tokens), prompts))


def difference(x: str, y: str) -> float:
    """How different two answers are: 1 - token F1 of one against the other (0: the same words)."""
    from .metrics.text import TokenF1

    return 1.0 - TokenF1().per_example(x, y, None)


def run(job: ABJob, log_dir: Path, status=contextlib.nullcontext) -> dict:
    """Answer, score, judge and write the report into job.out; returns the summary."""
    from . import metrics
    from .core.cache import atomic_dir

    a, b = parse_side(job.a, "a"), parse_side(job.b, "b")
    if a.name == b.name:
        raise FtxError(f"b: the two sides need different names (both are {a.name!r})")
    prompts, refs, ids = load_prompts(job)
    answers = {}
    for side in (a, b):
        what = f"ab: {side.name} answers {len(prompts)} prompts"
        with status(what), open_side(side, job, log_dir / f"ab-{side.name}.log") as ep:
            answers[side.name] = answer(ep, prompts, job.max_tokens, job.concurrency)
    scored = metrics.assess(answers, refs, _settings(), a.name) if refs else None
    rows = [
        {
            "id": ids[i],
            "prompt": p[-1]["content"],
            "reference": refs[i] if refs else None,
            a.name: answers[a.name][i],
            b.name: answers[b.name][i],
            "difference": difference(answers[a.name][i], answers[b.name][i]),
            "scores": {m: {s: scored["examples"][s][m][i] for s in answers} for m in scored["examples"][a.name]}
            if scored
            else {},
        }
        for i, p in enumerate(prompts)
    ]
    verdict = None
    with atomic_dir(job.out) as tmp:
        if job.judge:
            verdict = _judge(job, a, b, rows, refs, tmp, log_dir, status)
        summary = {
            "a": {"name": a.name, "source": a.source},
            "b": {"name": b.name, "source": b.source},
            "prompts": job.prompts,
            "n": len(rows),
            "max_tokens": job.max_tokens,
            "identical": sum(r[a.name] == r[b.name] for r in rows) / len(rows),
            "mean_difference": sum(r["difference"] for r in rows) / len(rows),
            "metrics": metrics.by_metric(scored["scores"]) if scored else {},
            "intervals": scored["intervals"] if scored else {},
            "deltas": scored["deltas"] if scored else {},
            "provenance": metrics.provenance(_settings()) if scored else {},
            "judge": verdict,
        }
        _write(tmp, summary, rows, a.name, b.name)
    return summary


def _settings():
    return SimpleNamespace(response_regex=None, task="chat", json_schema=None)


def _judge(job, a: Side, b: Side, rows, refs, tmp: Path, log_dir: Path, status) -> dict:
    from . import judge

    items = [
        {
            "id": r["id"],
            "question": r["prompt"],
            "answer_1": r[a.name],
            "answer_2": r[b.name],
            "preferred": judge.token_f1_preference(r[a.name], r[b.name], r["reference"]) if refs else None,
        }
        for r in rows
    ]
    what = f"ab: the judge compares {len(items)} answer pairs (both orders)"
    with status(what), judge.endpoint(job.judge, None, log_dir / "ab-judge.log") as client:
        result = judge.judge_pairs(
            client, items, names=(a.name, b.name), rubric=job.judge.rubric, checks=job.judge.checks
        )
    judge.write_jsonl(tmp / "judge.jsonl", result)
    return result.summary.model_dump()


def _write(tmp: Path, summary: dict, rows: list[dict], a: str, b: str) -> None:
    import json

    from .core import resources
    from .core.chat import write_jsonl

    write_jsonl(tmp / "answers.jsonl", rows)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (tmp / "summary.md").write_text(summary_md(summary, rows, a, b))
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(resources.folder("templates")), undefined=StrictUndefined, autoescape=True
    )  # autoescape: answers are model output, shown as text
    rows = sorted(rows, key=lambda r: -r["difference"])
    (tmp / "report.html").write_text(env.get_template("ab.html.j2").render(s=summary, rows=rows, a=a, b=b))


def summary_md(s: dict, rows: list[dict], a: str, b: str, show: int = 5) -> str:
    from . import metrics

    out = [f"# {b} vs {a} ({s['n']} prompts: {s['prompts']}, greedy, {s['max_tokens']} tokens)", ""]
    if s["metrics"]:
        out += [metrics.table(s["metrics"], [a, b], None, s["intervals"], s["deltas"]), ""]
    out.append(
        f"Identical answers: {100 * s['identical']:.0f}%; mean difference (1 - token F1): {s['mean_difference']:.2f}."
    )
    if s["judge"]:
        out.append(f"Judge: {s['judge']['text']}")
    out += ["", "## Where they differ most", "", f"| prompt | {a} | {b} |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["difference"])[:show]:
        out.append("| " + " | ".join(_cell(r[k]) for k in ("prompt", a, b)) + " |")
    return "\n".join(out) + "\n"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
