"""Serve stage: an OpenAI-compatible endpoint for what the pipeline produced, on any registered engine
(ftx.engines) behind ftx's gateway (ftx.serving), checked with the held-out prompts on the generation metrics
of the registry (ftx.metrics). An engine that serves GGUF files serves the exported artifact the gate selected
(`quant: auto`) as model `<recipe name>`; an engine that serves HF models (vLLM) serves the base model with this
recipe's adapter *unmerged* as model `<recipe name>` (its LoRA path, as a multi-LoRA deployment would).
`adapters` adds more model names. The endpoint stays up for the bench stage (a service of the runner)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from pydantic import BaseModel, Field

from ..core.config import key_dump
from ..engines import ENGINES
from ..serving import ServeSettings
from ..stage import Stage


class RecipeServe(ServeSettings):
    quant: str = Field("auto", description="GGUF engines: which exported file to serve; auto: the quality gate's pick")
    check_prompts: int = Field(8, ge=0, description="held-out prompts sent through the endpoint")


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
        return ServeResult(
            model=ep.model,
            engine=ctx.cfg.engine,
            startup_s=ep.startup_s,
            prompts=len(prompts),
            metrics=metrics.generation_scores(outs, refs, settings) if prompts else {},
            samples=[{"prompt": p[-1]["content"], "reference": r, "served": o} for p, r, o in zip(prompts, refs, outs)],
            **ep.info,
        )

    def headline(self, r: dict) -> str:
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
