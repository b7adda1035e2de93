"""Serve stage: an OpenAI-compatible endpoint for what the pipeline produced, on any registered engine
(ftx.engines) behind ftx's gateway (ftx.serving), checked with the held-out prompts on the generation metrics
of the registry (ftx.metrics). An engine that serves GGUF files serves the exported artifact the gate selected
(`quant: auto`) as model `<recipe name>`; an engine that serves HF models (vLLM) serves the base model with this
recipe's adapter *unmerged* as model `<recipe name>` (its LoRA path, as a multi-LoRA deployment would).
`adapters` adds more model names. The endpoint stays up for the bench stage (a service of the runner)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..core.config import key_dump
from ..engines import ENGINES
from ..serving import ServeSettings
from ..stage import Stage


class AdapterCheck(BaseModel):
    """HF engines (vLLM): the served adapter against HF + PEFT, so that an engine that ignores it fails the run."""

    model_config = ConfigDict(extra="forbid")
    tokens: int = Field(512, ge=16, description="validation tokens whose log-probabilities are compared")
    min_top1_agreement: float = Field(
        0.98, ge=0, le=1, description="share of positions where the engine's top-1 token is HF + PEFT's"
    )


class RecipeServe(ServeSettings):
    quant: str = Field("auto", description="GGUF engines: which exported file to serve; auto: the quality gate's pick")
    check_prompts: int = Field(8, ge=0, description="held-out prompts sent through the endpoint")
    adapter_check: AdapterCheck | None = Field(
        default_factory=AdapterCheck,
        description="HF engines: prompt log-probabilities of the served adapter vs HF + PEFT (and the engine's base "
        "model, which must differ); null: none",
    )


class AdapterProof(BaseModel):
    adapter: str
    tokens: int
    top1_agreement: float = Field(description="the engine's top-1 (adapter) = HF + PEFT's, per position")
    max_abs_logprob_diff: float = Field(description="of the actual next tokens, engine vs HF + PEFT")
    mean_abs_logprob_diff: float
    base_top1_agreement: float = Field(description="the engine's base model (no adapter) vs HF + PEFT: the floor")
    adapter_vs_base_mean_diff: float = Field(description="mean |log-prob difference| adapter vs base on the engine")
    passed: bool


class ServeResult(BaseModel):
    model: str = Field(description="the model name clients send")
    engine: str
    served: str = Field(description="the file or model directory the engine loaded")
    base: str | None = Field(None, description="HF engines: the base model's served name (the adapter is `model`)")
    adapters: list[str] = Field(default_factory=list, description="every adapter name the endpoint answers to")
    startup_s: float
    prompts: int
    metrics: dict[str, float] = Field(description="generation metrics of the served answers")
    samples: list[dict]
    adapter_proof: AdapterProof | None = Field(None, description="HF engines: the recipe's adapter vs HF + PEFT")


class Serve(Stage):
    name = "serve"
    config = RecipeServe
    result = ServeResult
    reads = ("name", "base_model", "eval.max_new_tokens", "eval.response_regex", "eval.task", "eval.json_schema")

    def upstream(self, recipe) -> tuple[str, ...]:
        return ("export", "data") if ENGINES[recipe.serve.engine].serves == "gguf" else ("adapter", "data")

    def key_config(self, section: RecipeServe):
        engine = ENGINES[section.engine]
        drop = {n for n in ENGINES if n != engine.name} | ({"quant"} if engine.serves != "gguf" else set())
        return {k: v for k, v in key_dump(section).items() if k not in drop}

    def validate(self, recipe, doc) -> None:
        from ..serving import check_adapter_kinds

        engine = ENGINES[recipe.serve.engine]
        check_adapter_kinds(doc, recipe.serve, ("serve", "adapters"))
        names = recipe.export.artifact_names()
        if engine.serves == "gguf" and recipe.serve.quant not in ("auto", *names):
            raise doc.fail(
                ("serve", "quant"),
                f"{recipe.serve.quant!r} is not among the exported files ({', '.join(names)}); use auto or one of them",
            )
        if recipe.name in recipe.serve.adapters:
            raise doc.fail(("serve", "adapters", recipe.name), "this name is the recipe's own model; pick another")

    @contextlib.contextmanager
    def service(self, ctx):
        from .. import serving

        cfg, name = ctx.cfg, ctx.setting("name")
        engine = ENGINES[cfg.engine]
        log = ctx.out_root / ".cache" / self.name / f"{ctx.key}.server.log"
        if engine.serves == "gguf":
            ex = ctx.upstream("export").result
            quant = ex["selected"] if cfg.quant == "auto" else cfg.quant
            model = ctx.file("export", next(f["file"] for f in ex["files"] if f["name"] == quant))
            info = {"served": model.name, "base": None, "adapters": list(cfg.adapters)}
            adapters = None
        else:
            base = Path(ctx.setting("base_model")).name
            base = f"{base}-base" if base == name or base in cfg.adapters else base
            model = ctx.base_dir
            adapters = {name: ctx.file("adapter", ctx.upstream("adapter").result["adapter_dir"]), **cfg.adapters}
            info = {"served": str(model), "base": base, "adapters": list(adapters)}
        with contextlib.ExitStack() as stack:
            with ctx.status(f"starting {engine.label} with {info['served']} ..."):
                ep = stack.enter_context(serving.start(cfg, model, info["base"] or name, log, adapters=adapters))
            if info["base"]:
                ep.model = name  # requests for the recipe's name go through the adapter
            ep.info = info
            yield ep

    def run(self, ctx, out: Path) -> ServeResult:
        from .. import metrics
        from ..core.chat import read_split, split_answers
        from ..serving import chat

        ep = ctx.service(self.name)
        held = read_split(
            ctx.file("data", ctx.upstream("data").result["heldout_file"] or ctx.upstream("data").result["val_file"])
        )[: ctx.cfg.check_prompts]
        settings = metrics.settings_of(ctx.setting)
        prompts, refs = split_answers(held)
        outs = [chat(ep, p, ctx.setting("eval.max_new_tokens")) for p in prompts]
        proof = None
        if ep.info["base"] and ctx.cfg.adapter_check:
            val = ctx.file("data", ctx.upstream("data").result["val_file"])
            adapter = ctx.file("adapter", ctx.upstream("adapter").result["adapter_dir"])
            with ctx.status(f"adapter proof: {ep.model} on {ENGINES[ctx.cfg.engine].label} vs HF + PEFT"):
                proof = adapter_proof(ctx.cfg, ep, ctx.base_dir, adapter, val)
        return ServeResult(
            model=ep.model,
            engine=ctx.cfg.engine,
            startup_s=ep.startup_s,
            prompts=len(prompts),
            metrics=metrics.generation_scores(outs, refs, settings) if prompts else {},
            samples=[{"prompt": p[-1]["content"], "reference": r, "served": o} for p, r, o in zip(prompts, refs, outs)],
            adapter_proof=proof,
            **ep.info,
        )

    def headline(self, r: dict) -> str:
        if r.get("adapter_proof"):
            p = r["adapter_proof"]
            return (
                f"{r['engine']}, ready in {r['startup_s']:.1f}s, adapter = HF+PEFT on {100 * p['top1_agreement']:.1f}%"
            )
        fmt = r["metrics"].get("format_rate")
        return f"{r['engine']}, ready in {r['startup_s']:.1f}s" + (
            f", format {100 * fmt:.0f}%" if fmt is not None else ""
        )

    def card_data(self, r: dict, recipe: str) -> dict:
        from .. import metrics

        return {
            **r,
            "samples": r["samples"][:4],
            "label": ENGINES[r["engine"]].label,
            "table": metrics.table({k: {"served": v} for k, v in r["metrics"].items()}, ["served"]),
        }


def adapter_proof(cfg: RecipeServe, ep, base_dir: Path, adapter_dir: Path, val_file: Path) -> AdapterProof:
    """The served adapter's prompt log-probabilities on validation tokens against HF + PEFT (fp32): top-1
    agreement and log-probability differences, and the engine's base model as the floor (an engine that ignored
    the adapter would answer like it). Fails (FtxError) below `min_top1_agreement` or when adapter and base give
    the same log-probabilities."""
    import numpy as np
    import torch
    from peft import PeftModel

    from ..core.errors import FtxError
    from ..core.models import check_sequences, load_base, token_logits

    engine, check = ENGINES[cfg.engine], cfg.adapter_check
    model, tok = load_base(base_dir, "lora", "cpu")
    seqs = check_sequences(tok, val_file, check.tokens)
    ref = torch.log_softmax(token_logits(PeftModel.from_pretrained(model, adapter_dir).eval(), seqs), -1).numpy()
    rows, at = {"adapter": [], "base": []}, 0
    hf_actual, hf_top = [], []
    for ids in seqs:
        lp = ref[at : at + len(ids) - 1]
        hf_actual.append(lp[np.arange(len(ids) - 1), ids[1:]])
        hf_top.append(lp.argmax(-1))
        at += len(ids)
        for kind, name in (("adapter", ep.model), ("base", ep.info["base"])):
            got = engine.prompt_logprobs(ep.base_url, ep.api_key, name, ids)
            if got is None:
                raise FtxError(f"serve.adapter_check: {engine.label} does not report prompt log-probabilities")
            rows[kind].append(got)
    hf_actual, hf_top = np.concatenate(hf_actual), np.concatenate(hf_top)
    a_lp, a_top = (np.concatenate([g[i] for g in rows["adapter"]]) for i in (0, 1))
    b_lp, b_top = (np.concatenate([g[i] for g in rows["base"]]) for i in (0, 1))
    diff = np.abs(a_lp - hf_actual)
    proof = AdapterProof(
        adapter=ep.model,
        tokens=int(hf_top.size),
        top1_agreement=float((a_top == hf_top).mean()),
        max_abs_logprob_diff=float(diff.max()),
        mean_abs_logprob_diff=float(diff.mean()),
        base_top1_agreement=float((b_top == hf_top).mean()),
        adapter_vs_base_mean_diff=float(np.abs(a_lp - b_lp).mean()),
        passed=False,
    )
    ignored = proof.adapter_vs_base_mean_diff < 1e-4
    proof.passed = proof.top1_agreement >= check.min_top1_agreement and not ignored
    if not proof.passed:
        why = (
            "gives the base model's log-probabilities: the adapter is ignored"
            if ignored
            else f"agrees with HF + PEFT on only {proof.top1_agreement:.1%} of top-1 tokens "
            f"(< serve.adapter_check.min_top1_agreement {check.min_top1_agreement:.0%}; the base model alone: "
            f"{proof.base_top1_agreement:.1%})"
        )
        raise FtxError(f"{engine.label} serving adapter {ep.model!r} {why}")
    return proof
