"""Eval stage: the base model against the fine-tuned one (base + adapter), on every metric of the registry
(ftx.metrics): loss metrics on the validation split, generation metrics on greedy answers to the held-out
prompts (the recipe's `eval.response_regex` states the behaviour fine-tuning should produce; `eval.task` adds
the structured or translation metrics). Then what the task metrics cannot see:

    forgetting  IFEval (Google's instruction-following prompts with programmatic checks, vendored: see
                ftx.metrics.ifeval) answered by both models: a fine-tune that lost general skills follows fewer
                instructions. `eval.max_forgetting` fails the run when the drop is larger.
    judge       a pairwise LLM judge (ftx.judge: MT-Bench's prompt, both orders, sanity checks) on the two models'
                answers; a judge that fails its checks is reported unreliable and names no winner.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.config import InputFile
from ..judge import JudgeConfig
from ..stage import Stage

MODELS = {"base": "base", "finetuned": "fine-tuned"}


class ForgettingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: int | None = Field(
        120, ge=8, description="IFEval prompts, stratified by instruction type; null: all 541 (or `forgetting: full`)"
    )
    max_new_tokens: int = Field(256, ge=16, description="tokens each model may answer an IFEval prompt with")


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(48, ge=1, description="greedy tokens generated per held-out prompt")
    response_regex: str | None = Field(
        None, description="a held-out answer that fully matches follows the trained format (the format_rate metric)"
    )
    max_prompts: int = Field(24, ge=1, description="held-out prompts answered by each model")
    task: Literal["chat", "structured", "translation"] = Field(
        "chat",
        description="what the answers are, which picks the metrics: chat (exact, token F1, ROUGE-L, chrF), "
        "structured (+ JSON parse rate, per-field accuracy, JSON Schema validity), translation (+ corpus "
        "sacreBLEU and chrF with their signatures)",
    )
    json_schema: InputFile | None = Field(
        None, description="JSON Schema (a .json file) every answer must validate against (task: structured)"
    )
    forgetting: ForgettingConfig | None = Field(
        default_factory=ForgettingConfig,
        description="the IFEval forgetting check on base and fine-tuned (`quick`: the defaults, `full`: all 541 "
        "prompts, null: off)",
    )
    max_forgetting: float | None = Field(
        None,
        gt=0,
        le=1,
        description="fail the run when IFEval prompt-level loose accuracy drops by more than this (0.05: 5 points)",
    )
    judge: JudgeConfig | None = Field(None, description="a pairwise LLM judge of base vs fine-tuned answers")

    @model_validator(mode="before")
    @classmethod
    def _forgetting_words(cls, data):
        if isinstance(data, dict) and data.get("forgetting") in ("quick", "full"):
            data = {**data, "forgetting": {} if data["forgetting"] == "quick" else {"prompts": None}}
        return data

    @model_validator(mode="after")
    def _gate_needs_check(self):
        if self.max_forgetting is not None and self.forgetting is None:
            raise ValueError("max_forgetting needs the forgetting check (eval.forgetting is null)")
        return self


class Sample(BaseModel):
    prompt: str
    reference: str
    outputs: dict[str, str] = Field(description="model -> its answer")


class Forgetting(BaseModel):
    prompts: int
    max_new_tokens: int
    scores: dict[str, dict[str, float]] = Field(description="model -> IFEval figure (prompt_loose, ...) -> value")
    intervals: dict[str, dict[str, list[float]]] = Field(description="figure -> model -> 95% interval")
    deltas: dict[str, dict[str, float]] = Field(description="figure -> fine-tuned minus base {delta, low, high}")
    by_type: dict[str, dict[str, dict[str, float]]] = Field(
        description="instruction type -> model -> {n, strict, loose}"
    )
    drop: float = Field(description="base minus fine-tuned prompt-level loose accuracy (positive: forgot)")
    max_forgetting: float | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    drift: dict[str, float] | None = Field(
        None,
        description="label-free: each model's loss (nats/token) on the base model's own IFEval answers and the "
        "perplexity ratio fine-tuned / base (above 1: the fine-tune moved away from what the base model would say)",
    )


class EvalResult(BaseModel):
    metrics: dict[str, dict[str, float]] = Field(description="metric -> model (base, finetuned) -> value")
    intervals: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict, description="generation metric -> model -> 95% bootstrap interval [low, high]"
    )
    deltas: dict[str, dict[str, dict[str, float]]] = Field(
        default_factory=dict,
        description="generation metric -> finetuned -> paired difference from base {delta, low, high} (95%)",
    )
    prompts: int
    samples: list[Sample]
    provenance: dict[str, str] = Field(
        default_factory=dict, description="metric -> the library and version (or signature) that computed it"
    )
    forgetting: Forgetting | None = None
    judge: dict | None = Field(None, description="the judge's summary (ftx.judge.Summary); raw verdicts: judge.jsonl")


IFEVAL = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")
DRIFT_MAX_LEN = 2048  # an IFEval prompt and a base answer fit whole


def evaluate(
    cfg: EvalConfig,
    base_dir: Path,
    adapter_dir: Path,
    val_file: Path,
    heldout_file: Path | None,
    max_seq_len: int,
    out: Path,
    base_model: str,
    status=contextlib.nullcontext,
) -> EvalResult:
    from peft import PeftModel

    from .. import metrics
    from ..core import chat
    from ..core.models import generate, load_base, pick_device, response_loss
    from ..metrics import ifeval

    model, tok = load_base(base_dir, "lora", pick_device())
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    val = chat.read_examples(val_file)
    held = chat.read_split(heldout_file or val_file)[: cfg.max_prompts]  # chat conversations; none for text data
    prompts, refs = chat.split_answers(held)
    ife_rows = ifeval.load_prompts(cfg.forgetting.prompts) if cfg.forgetting else []
    mt = _mtbench_prompts(cfg.judge)
    scores, outputs, ife, mt_answers, drift, base_answers = {}, {}, {}, {}, {}, None
    for name, label in MODELS.items():
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            with status(f"eval: {label} answers {len(prompts)} held-out prompts"):
                outputs[name] = generate(model, tok, prompts, cfg.max_new_tokens) if prompts else []
                scores[name] = metrics.loss_scores(response_loss(model, tok, val, max_seq_len), cfg)
            if ife_rows:
                with status(f"eval: {label} answers {len(ife_rows)} IFEval prompts (forgetting)"):
                    asks = [[{"role": "user", "content": r["prompt"]}] for r in ife_rows]
                    ife[name] = generate(model, tok, asks, cfg.forgetting.max_new_tokens)
                    base_answers = base_answers or [
                        {"messages": [*q, {"role": "assistant", "content": a}]}
                        for q, a in zip(asks, ife["base"])
                        if a.strip()
                    ]
                    drift[name] = response_loss(model, tok, base_answers, DRIFT_MAX_LEN) if base_answers else None
            if mt:
                with status(f"eval: {label} answers {len(mt)} MT-Bench questions"):
                    asks = [[{"role": "user", "content": q["turns"][0]}] for q in mt]
                    mt_answers[name] = generate(model, tok, asks, cfg.judge.answer_tokens)
    del model
    judged = metrics.assess(outputs, refs, cfg, "base") if prompts else {"scores": {}, "intervals": {}, "deltas": {}}
    for name, figures in judged["scores"].items():
        scores[name].update(figures)
    samples = [
        Sample(prompt=p[-1]["content"], reference=r, outputs={n: outputs[n][i] for n in MODELS})
        for i, (p, r) in enumerate(zip(prompts, refs))
    ]
    forgetting = _forgetting(cfg, ife_rows, ife, drift) if ife_rows else None
    verdict = None
    if cfg.judge:
        if mt:
            items = [
                {
                    "id": q["question_id"],
                    "category": q["category"],
                    "question": q["turns"][0],
                    "answer_1": mt_answers["base"][i],
                    "answer_2": mt_answers["finetuned"][i],
                }
                for i, q in enumerate(mt)
            ]
        else:
            items = _heldout_pairs(prompts, refs, outputs)
        with status(f"eval: the judge compares {len(items)} answer pairs (both orders)"):
            verdict = _judge(cfg.judge, items, base_model, out)
    return EvalResult(
        metrics=metrics.by_metric(scores),
        intervals=judged["intervals"],
        deltas=judged["deltas"],
        prompts=len(prompts),
        samples=samples,
        provenance=metrics.provenance(cfg),
        forgetting=forgetting,
        judge=verdict,
    )


def _mtbench_prompts(cfg: JudgeConfig | None) -> list[dict]:
    from .. import judge

    return judge.questions(cfg.questions) if cfg and cfg.prompts == "mtbench" else []


def _heldout_pairs(prompts, refs, outputs) -> list[dict]:
    """Base and fine-tuned answers to the held-out prompts, with token F1 against the reference as the
    programmatic preference the judge's verdicts are checked against."""
    from .. import judge

    return [
        {
            "id": i,
            "question": p[-1]["content"],
            "answer_1": outputs["base"][i],
            "answer_2": outputs["finetuned"][i],
            "preferred": judge.token_f1_preference(outputs["base"][i], outputs["finetuned"][i], r),
        }
        for i, (p, r) in enumerate(zip(prompts, refs))
    ]


def _judge(cfg: JudgeConfig, items: list[dict], base_model: str, out: Path) -> dict:
    from .. import judge

    with judge.endpoint(cfg, base_model, out / "judge-server.log") as client:
        result = judge.judge_pairs(client, items, names=("base", "fine-tuned"), rubric=cfg.rubric, checks=cfg.checks)
    judge.write_jsonl(out / "judge.jsonl", result)
    return result.summary.model_dump()


def _forgetting(cfg: EvalConfig, rows: list[dict], answers: dict[str, list[str]], drift=None) -> Forgetting:
    """IFEval figures of both models with 95% intervals and paired differences; raises (with the table) when the
    fine-tune's prompt-level loose accuracy fell by more than eval.max_forgetting."""
    from .. import metrics
    from ..core.errors import FtxError
    from ..metrics import ifeval

    per = {name: ifeval.score(rows, answers[name]) for name in MODELS}
    examples = {name: {k: per[name][k] for k in IFEVAL} for name in MODELS}
    intervals, deltas = metrics.uncertainty(examples, "base")
    types = sorted({t for name in MODELS for t in per[name]["by_type"]})
    result = Forgetting(
        prompts=len(rows),
        max_new_tokens=cfg.forgetting.max_new_tokens,
        scores={name: metrics.means(examples[name]) for name in MODELS},
        intervals=intervals,
        deltas={k: v["finetuned"] for k, v in deltas.items()},
        by_type={t: {name: per[name]["by_type"][t] for name in MODELS if t in per[name]["by_type"]} for t in types},
        drop=metrics.means(examples["base"])["prompt_loose"] - metrics.means(examples["finetuned"])["prompt_loose"],
        max_forgetting=cfg.max_forgetting,
        versions=ifeval.versions(),
        drift=_drift(drift) if drift and None not in drift.values() else None,
    )
    if cfg.max_forgetting is not None and result.drop > cfg.max_forgetting:
        raise FtxError(
            f"eval.max_forgetting: IFEval prompt-level loose accuracy fell by {100 * result.drop:.1f} points "
            f"(allowed {100 * cfg.max_forgetting:.1f}): the fine-tune forgot how to follow instructions\n"
            + forgetting_table(result.model_dump())
        )
    return result


def _drift(nll: dict[str, float]) -> dict[str, float]:
    import math

    return {
        "base_nll": nll["base"],
        "finetuned_nll": nll["finetuned"],
        "ppl_ratio": math.exp(min(nll["finetuned"] - nll["base"], 50)),
    }


def forgetting_table(f: dict) -> str:
    """Markdown: the four IFEval figures for base and fine-tuned with intervals and the paired difference."""
    labels = {
        "prompt_strict": "prompt-level strict",
        "prompt_loose": "prompt-level loose",
        "inst_strict": "instruction-level strict",
        "inst_loose": "instruction-level loose",
    }
    rows = ["| IFEval | base | fine-tuned | Δ (95% CI) |", "|---|---:|---:|---:|"]
    for k, label in labels.items():
        cells = []
        for name in MODELS:
            lo, hi = f["intervals"][k][name]
            cells.append(f"{100 * f['scores'][name][k]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
        d = f["deltas"][k]
        cells.append(f"{100 * d['delta']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


class Eval(Stage):
    name = "eval"
    config = EvalConfig
    result = EvalResult
    needs = ("adapter", "data")
    reads = ("data.max_seq_len", "base_model")
    # 2: token F1, 95% intervals and paired base -> fine-tuned differences; 3: ROUGE-L, chrF, answer length,
    # truncation, the structured and translation metrics, the IFEval forgetting check, the judge; 4: the
    # label-free drift on the base model's own IFEval answers
    revision = 4

    def run(self, ctx, out: Path) -> EvalResult:
        d = ctx.upstream("data").result
        adapter = ctx.upstream("adapter")
        return evaluate(
            ctx.cfg,
            ctx.base_dir,
            ctx.file("adapter", adapter.result["adapter_dir"]),
            ctx.file("data", d["val_file"]),
            ctx.file("data", d["heldout_file"]),
            ctx.setting("data.max_seq_len"),
            out,
            ctx.setting("base_model"),
            ctx.status,
        )

    def headline(self, r: dict) -> str:
        m = r["metrics"]
        fmt = m.get("format_rate")
        head = f"format {100 * fmt['base']:.0f}% -> {100 * fmt['finetuned']:.0f}%, " if fmt else ""
        ppl = m["val_perplexity"]
        f = r.get("forgetting")
        tail = f", IFEval loose {100 * f['scores']['base']['prompt_loose']:.0f}% -> " if f else ""
        tail += f"{100 * f['scores']['finetuned']['prompt_loose']:.0f}%" if f else ""
        return f"{head}val ppl {ppl['base']:.2f} -> {ppl['finetuned']:.2f}{tail}"

    def card_data(self, r: dict, recipe: str) -> dict:
        from .. import metrics

        return {
            **r,
            "samples": r["samples"][:6],
            "table": metrics.table(r["metrics"], list(MODELS), MODELS, r.get("intervals"), r.get("deltas")),
            "forgetting_table": forgetting_table(r["forgetting"]) if r.get("forgetting") else None,
        }
