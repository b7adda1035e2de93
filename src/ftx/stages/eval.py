"""Eval stage: the base model against the fine-tuned one (base + adapter), on every metric of the registry
(ftx.metrics): loss metrics on the validation split, generation metrics on greedy answers to the held-out
prompts. The recipe's `eval.response_regex` states the behaviour fine-tuning should produce."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..stage import Stage

MODELS = {"base": "base", "finetuned": "fine-tuned"}


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(48, ge=1, description="greedy tokens generated per held-out prompt")
    response_regex: str | None = Field(
        None, description="a held-out answer that fully matches follows the trained format (the format_rate metric)"
    )
    max_prompts: int = Field(24, ge=1, description="held-out prompts answered by each model")


class Sample(BaseModel):
    prompt: str
    reference: str
    outputs: dict[str, str] = Field(description="model -> its answer")


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


def evaluate(
    cfg: EvalConfig, base_dir: Path, adapter_dir: Path, val_file: Path, heldout_file: Path | None, max_seq_len: int
) -> EvalResult:
    from peft import PeftModel

    from .. import metrics
    from ..core import chat
    from ..core.models import generate, load_base, pick_device, response_loss

    model, tok = load_base(base_dir, "lora", pick_device())
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    val = chat.read_examples(val_file)
    held = chat.read_split(heldout_file or val_file)[: cfg.max_prompts]  # chat conversations; none for text data
    prompts, refs = chat.split_answers(held)
    scores, outputs, examples = {}, {}, {}
    for name in MODELS:
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            outputs[name] = generate(model, tok, prompts, cfg.max_new_tokens) if prompts else []
            examples[name] = metrics.per_example(outputs[name], refs, cfg) if prompts else {}
            scores[name] = {
                **metrics.loss_scores(response_loss(model, tok, val, max_seq_len), cfg),
                **metrics.means(examples[name]),
            }
    intervals, deltas = metrics.uncertainty(examples, "base")
    samples = [
        Sample(prompt=p[-1]["content"], reference=r, outputs={n: outputs[n][i] for n in MODELS})
        for i, (p, r) in enumerate(zip(prompts, refs))
    ]
    return EvalResult(
        metrics=metrics.by_metric(scores), intervals=intervals, deltas=deltas, prompts=len(prompts), samples=samples
    )


class Eval(Stage):
    name = "eval"
    config = EvalConfig
    result = EvalResult
    needs = ("adapter", "data")
    reads = ("data.max_seq_len",)
    revision = 2  # 2: token F1, 95% intervals and paired base -> fine-tuned differences

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
        )

    def headline(self, r: dict) -> str:
        m = r["metrics"]
        fmt = m.get("format_rate")
        head = f"format {100 * fmt['base']:.0f}% -> {100 * fmt['finetuned']:.0f}%, " if fmt else ""
        ppl = m["val_perplexity"]
        return f"{head}val ppl {ppl['base']:.2f} -> {ppl['finetuned']:.2f}"

    def card_data(self, r: dict, recipe: str) -> dict:
        from .. import metrics

        return {
            **r,
            "samples": r["samples"][:6],
            "table": metrics.table(r["metrics"], list(MODELS), MODELS, r.get("intervals"), r.get("deltas")),
        }
