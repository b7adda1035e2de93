"""Export stage: the merged HF model -> an export format's reference artifact and its variants (ftx.formats; GGUF:
f16 + a quant ladder) -> the quality gate (ftx.formats.gate: each variant against the reference on the held-out
+ validation conversations, rendered with the chat template) selects the smallest variant within budget ->
packaging steps (ftx.packaging: a proven Modelfile, a GGUF LoRA). Each artifact's top-1 agreement with the HF
model on validation tokens is checked too (the reference must reach export.min_top1_agreement)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from ..core.config import InputDir, InputFile
from ..core.errors import FtxError
from ..formats import FORMATS
from ..formats.gate import QualityGate
from ..formats.search import Target
from ..formats.termination import Termination, TerminationResult
from ..packaging import STEPS, Job
from ..stage import Artifact, Stage


class _ExportBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal[tuple(FORMATS)] = Field("gguf", description="export format (settings in its own section)")
    quality_gate: QualityGate | None = Field(
        default_factory=QualityGate,
        description="budgets every variant is held to against the reference; null keeps every variant",
    )
    min_top1_agreement: float = Field(
        0.99, ge=0, le=1, description="reference artifact vs the HF model, on validation tokens"
    )
    termination: Termination | None = Field(
        default_factory=Termination,
        description="every artifact answers held-out prompts: the share ending on the stop set is gated "
        "(ftx.formats.termination); null: no check",
    )
    check_tokens: int = Field(512, ge=16, description="validation tokens for the top-1 checks against HF")
    target: Target | None = Field(
        None,
        description="also a variant named `target` searched to this size budget: one quant type per tensor group "
        "for the lowest KLD (ftx.formats.search, with the training conversations' importance matrix); served "
        "when it passes the gate",
    )

    @model_validator(mode="after")
    def _task_budgets_need_answers(self):
        g = self.quality_gate
        if g and (g.min_task_ratio is not None or g.max_flip_rate is not None) and self.termination is None:
            raise ValueError("quality_gate.min_task_ratio / max_flip_rate need the held-out answers of termination")
        return self

    eval_tokens: int = Field(
        4096,
        ge=256,
        description="held-out + validation tokens the quality gate scores each "
        "artifact on (the first conversations up to this many)",
    )

    def artifact_names(self) -> list[str]:
        fmt = FORMATS[self.format]
        return fmt.artifact_names(getattr(self, fmt.name)) + (["target"] if self.target else [])


def _step_validator(step):
    def check(cls, value, info):
        if step.enabled(value):
            fmt = info.data.get("format")
            if fmt is not None and fmt not in step.formats:
                raise ValueError(f"{step.name} works with {', '.join(step.formats)} exports only")
            settings = info.data.get(fmt)
            if settings is not None:
                step.check(value, info.data, FORMATS[fmt].artifact_names(settings))
        return value

    return field_validator(step.name)(check)


ExportConfig = create_model(
    "ExportConfig",
    __base__=_ExportBase,
    __validators__={f"_check_{s.name}": _step_validator(s) for s in STEPS},
    **{
        f.name: (f.settings, Field(default_factory=f.settings, description=f"{f.name} format settings"))
        for f in FORMATS.values()
    },
    **{s.name: (s.settings, Field(s.default, description=s.description)) for s in STEPS},
)


class ExportJob(ExportConfig):
    """`ftx export`: the export settings plus the model and files it reads and where it writes."""

    model: InputDir = Field(description="the merged HF model directory")
    val: InputFile = Field(description="JSONL conversations: top-1 check vs HF and the quality gate's text")
    heldout: InputFile | None = Field(None, description="more evaluation conversations for the quality gate")
    out: Path = Field(description="output directory")
    name: str = Field("model", description="model name (GGUF metadata, Modelfile)")
    bundle: Path | None = Field(
        None,
        description="also write a self-contained folder to ship (GGUF, Modelfile, proof, "
        "export.json, model card, license, SHA256SUMS)",
    )
    calibration: InputFile | None = Field(None, description="conversations (JSONL) for the importance matrix")
    adapter: InputDir | None = Field(None, description="lora_adapter: the peft adapter to export as a GGUF LoRA")
    base: str | None = Field(None, description="lora_adapter: the adapter's base model (packaged name or HF dir)")


class ExportFile(BaseModel):
    name: str
    file: str
    size_bytes: int
    top1_agreement: float = Field(description="vs the HF model on validation tokens")
    ppl: float | None = None
    ppl_ratio: float | None = Field(None, description="PPL(variant) / PPL(reference) on the evaluation text")
    mean_kld: float | None = None
    p99_kld: float | None = None
    same_top: float | None = Field(None, description="tokens whose top-1 equals the reference's")
    all_mean_kld: float | None = Field(None, description="mean KLD over every token, a shared prefix counted once")
    all_ppl_ratio: float | None = Field(None, description="PPL ratio over every token, a shared prefix counted once")
    clean_stop_rate: float | None = Field(None, description="held-out answers that ended on the stop set")
    ends: dict[str, int] | None = Field(None, description="how the held-out answers ended: end token -> count")
    task: dict[str, float] | None = Field(None, description="task metrics of its held-out answers (ftx.metrics)")
    task_ratio: dict[str, float | None] | None = Field(None, description="each task metric over the reference's")
    flips: dict[str, int | float] | None = Field(
        None, description="answers whose pass/fail verdict differs from the reference's (per metric: lost, gained)"
    )
    passed: bool | None = Field(None, description="within the quality gate (None: reference or no gate)")


class ExportResult(BaseModel):
    format: str
    files: list[ExportFile]
    selected: str = Field(description="the smallest variant within the gate (the smallest variant without a gate)")
    gate: QualityGate | None = None
    eval_tokens: int = 0
    scored: dict[str, int] = Field(
        default_factory=dict,
        description="how the evaluation positions split: assistant (the gate's), prompt, and of each those in a "
        "prefix already scored in an earlier conversation (counted once in the all-token figures)",
    )
    lineage: str | None = None
    termination: TerminationResult | None = None
    task_table: dict | None = Field(
        None,
        description="task metrics x artifact (the merged HF model, then every file) with 95% intervals and paired "
        "differences from the merged model, answers cut at eval.max_new_tokens",
    )
    search: dict | None = Field(
        None, description="export.target: the searched variant's budget, per-group types, sensitivities, KLDs"
    )
    extras: dict = Field(default_factory=dict, description="format facts (GGUF: the importance matrix)")
    packaging: dict[str, dict] = Field(default_factory=dict, description="result of each packaging step that ran")


def eval_sequences(tok, files: list[Path | None], max_tokens: int | None = None) -> list[dict]:
    """The held-out and validation conversations rendered with the model's own chat template (special tokens as
    the model sees them; `input_ids` and the training `labels`, which mark the assistant tokens) - what the
    quality gate scores; the first ones up to `max_tokens`."""
    from ..core.chat import read_examples, render_example

    rows, total = [], 0
    for f in files:
        for ex in read_examples(f) if f else []:
            if "messages" in ex or "text" in ex:
                r = render_example(tok, ex, 4096)
                if max_tokens and total + len(r["input_ids"]) > max_tokens and rows:
                    return rows
                rows.append(r)
                total += len(r["input_ids"])
    return rows


class _Top1:
    """Top-1 agreement with the HF model, taken in passing from the log-probabilities the gate already computes
    (the validation conversations are among the gate's sequences), so each artifact is evaluated once."""

    def __init__(self, eval_seqs: list[list[int]], check_seqs: list[list[int]], ref_logits):
        index = {tuple(s): i for i, s in enumerate(eval_seqs)}
        self.at = [index.get(tuple(s)) for s in check_seqs]
        self.ref = ref_logits.argmax(-1)
        self.lengths = [len(s) for s in check_seqs]

    def usable(self) -> bool:
        return all(i is not None for i in self.at)

    def tee(self, logprobs):
        """Pass (log-probs, ids) through, keeping the argmax of the check sequences."""
        self.tops = {}
        wanted = set(self.at)
        for i, (lp, ids) in enumerate(logprobs):
            if i in wanted:
                self.tops[i] = lp.argmax(-1)
            yield lp, ids

    def agreement(self) -> float:
        import numpy as np

        return float((np.concatenate([self.tops[i] for i in self.at]) == self.ref).mean())


def export(
    cfg,
    model_dir: Path,
    val_file: Path,
    name: str,
    num_ctx: int,
    out: Path,
    heldout_file: Path | None = None,
    lineage: str | None = None,
    base_model: str | None = None,
    task_settings=None,
    task_tokens: int | None = None,
    base_dir: Path | None = None,
    adapter_dir: Path | None = None,
    calib_file: Path | None = None,
) -> ExportResult:
    from rich.progress import Progress

    from ..core.chat import end_ids, prompt_ids, read_split, split_answers
    from ..core.models import check_sequences, load_base, token_logits
    from ..formats import gate, termination

    fmt = FORMATS[cfg.format]
    settings = getattr(cfg, fmt.name)
    fmt.check(settings, model_dir, out)
    model, tok = load_base(model_dir, "lora", "cpu")
    seqs = check_sequences(tok, val_file, cfg.check_tokens)
    ref_logits = token_logits(model, seqs).numpy()
    del model
    rows = eval_sequences(tok, [heldout_file, val_file], cfg.eval_tokens)
    eval_seqs = [r["input_ids"] for r in rows]
    top1 = _Top1(eval_seqs, seqs, ref_logits)
    if not top1.usable():  # the check conversations were cut off by eval_tokens: score them on their own
        missing = {tuple(s) for s, i in zip(seqs, top1.at) if i is None}
        rows += [r for r in eval_sequences(tok, [val_file]) if tuple(r["input_ids"]) in missing]
        eval_seqs = [r["input_ids"] for r in rows]
        top1 = _Top1(eval_seqs, seqs, ref_logits)
    positions = gate.Positions(rows)
    calibration = [tok.decode(r["input_ids"]) for r in eval_sequences(tok, [calib_file])] if calib_file else None
    scratch = out / ".reference"
    scratch.mkdir()
    with Progress() as progress:
        task = progress.add_task("export", total=3 + len(cfg.artifact_names()))
        progress.update(task, description="convert")
        ref_name, ref_path = fmt.reference(settings, model_dir, out, name, lineage, base_model)
        progress.advance(task)
        progress.update(task, description=f"reference log-probs ({sum(len(x) - 1 for x in eval_seqs)} tokens)")
        reference = gate.save_reference(
            top1.tee(fmt.logprobs(ref_path, eval_seqs)), eval_seqs, scratch / "ref.npy", positions
        )
        files = [
            ExportFile(
                name=ref_name,
                file=ref_path.name,
                size_bytes=ref_path.stat().st_size,
                top1_agreement=top1.agreement(),
                ppl=reference["ppl"],
            )
        ]
        progress.advance(task)
        if files[0].top1_agreement < cfg.min_top1_agreement:
            raise FtxError(
                f"{ref_path.name} agrees with the HF model on only {files[0].top1_agreement:.1%} of validation "
                f"tokens (< export.min_top1_agreement {cfg.min_top1_agreement:.0%})"
            )
        searched = None

        def variants():
            nonlocal searched
            yield from fmt.variants(settings, ref_path, out, calibration)
            if cfg.target:
                if not calib_file:
                    raise FtxError("export.target searches on the training conversations: run it from a recipe")
                vname, path, searched = _search(
                    fmt, settings, cfg.target, tok, calib_file, ref_path, out, calibration, progress, task
                )
                yield vname, path

        for vname, path in variants():
            progress.update(task, description=f"KL divergence and top-1 vs HF: {vname}")
            metrics = gate.compare(top1.tee(fmt.logprobs(path, eval_seqs)), scratch / "ref.npy", reference)
            f = ExportFile(
                name=vname, file=path.name, size_bytes=path.stat().st_size, top1_agreement=top1.agreement(), **metrics
            )
            files.append(f)
            progress.advance(task)
        term, task_table = None, None
        if cfg.termination:
            held, refs = split_answers(read_split(heldout_file or val_file)[: cfg.termination.prompts])
            prompts = [prompt_ids(tok, m) for m in held]
            declared = {i: tok.convert_ids_to_tokens(i) for i in end_ids(tok, model_dir)}
            term = termination.check(
                fmt,
                [(f.name, out / f.file) for f in files],
                prompts,
                declared,
                cfg.termination,
                tok.chat_template,
                lambda what: progress.update(task, description=what),
            )
            progress.update(task, description=f"merged model (HF) answers {len(held)} held-out prompts")
            merged_answers = _hf_answers(model_dir, tok, held, task_tokens or cfg.termination.max_tokens)
            task_table = task_metrics(files, refs, term, tok, task_settings, task_tokens, merged_answers)
            for f in files:
                f.clean_stop_rate, f.ends = term.files[f.name].clean_stop_rate, term.files[f.name].ends
        progress.advance(task)
    for f in files[1:]:  # each variant's verdict: the gate's budgets (task ones included), and it must stop
        f.passed = cfg.quality_gate.within(f.model_dump()) if cfg.quality_gate else None
        if term and f.clean_stop_rate < cfg.termination.min_clean_stop_rate:
            f.passed = False  # a quant that does not stop does not ship, whatever its KLD
    shutil.rmtree(scratch)
    selected = gate.select(files, cfg.quality_gate, ref_name, prefer="target" if cfg.target else None)
    job = Job(
        cfg=cfg,
        out=out,
        name=name,
        num_ctx=num_ctx,
        tok=tok,
        model_dir=model_dir,
        files=files,
        selected=selected,
        seqs=seqs,
        ref_logits=ref_logits,
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        extra_stops=term.extended if term else [],
    )
    packaging = {
        s.name: s.run(getattr(cfg, s.name), job).model_dump() for s in STEPS if s.enabled(getattr(cfg, s.name))
    }
    return ExportResult(
        format=fmt.name,
        files=files,
        selected=selected,
        gate=cfg.quality_gate,
        eval_tokens=sum(len(x) - 1 for x in eval_seqs),
        scored=positions.split,
        lineage=lineage,
        termination=term,
        task_table=task_table,
        search=searched,
        extras=fmt.extras(settings, out),
        packaging=packaging,
    )


def _search(fmt, settings, target, tok, calib_file: Path, ref_path: Path, out: Path, calibration, progress, task):
    """export.target: the format's search, scoring each candidate by its mean KLD from the reference on the first
    `target.search_tokens` tokens of the training conversations (assistant tokens, as the gate scores)."""
    from ..formats import gate

    rows = eval_sequences(tok, [calib_file], target.search_tokens)
    seqs = [r["input_ids"] for r in rows]
    ref = out / ".reference" / "search.npy"
    progress.update(task, description=f"quant search: reference log-probs ({sum(map(len, seqs))} training tokens)")
    saved = gate.save_reference(fmt.logprobs(ref_path, seqs), seqs, ref, gate.Positions(rows))

    def score(path: Path) -> float:
        return gate.compare(fmt.logprobs(path, seqs), ref, saved)["mean_kld"]

    name, path, report = fmt.search(
        settings, target, ref_path, out, calibration, score, lambda what: progress.update(task, description=what)
    )
    return name, path, {**report, "search_tokens": sum(len(s) - 1 for s in seqs)}


def _hf_answers(model_dir: Path, tok, prompts: list[list[dict]], max_new_tokens: int) -> list:
    """The merged model's own greedy answers (HF, fp32), generated as the eval stage generates them."""
    from ..core.models import generate, load_base

    model, _ = load_base(model_dir, "lora", "cpu")
    return generate(model, tok, prompts, max_new_tokens)


def task_metrics(
    files: list[ExportFile], refs: list[str], term, tok, settings, max_tokens: int | None, merged: list
) -> dict:
    """Each artifact's held-out answers (the termination proof's, cut at the eval stage's `max_tokens`: greedy
    decoding with a lower limit gives exactly those first tokens, so every artifact is scored as the eval stage
    scores base and fine-tuned) and the merged HF model's, scored with the eval metrics against the references:
    a metric x artifact table with 95% intervals and paired differences from the merged model; per file, the ratio
    of each metric to the reference artifact's and the answers whose pass/fail verdict flipped from it."""
    from .. import metrics
    from ..core.chat import Answer

    settings = settings or SimpleNamespace(response_regex=None)
    stop = {tok.convert_tokens_to_ids(t) for t in term.stop_set}
    limit = max_tokens or term.max_tokens

    def answer(ids: list[int]) -> Answer:
        ran_out = len(ids) > limit or (len(ids) >= term.max_tokens and (not ids or ids[-1] not in stop))
        cut = ids[:limit]
        return Answer.of(tok.decode(cut, skip_special_tokens=True).strip(), len(cut), ran_out)

    outputs = {"merged": merged, **{f.name: [answer(a) for a in term.answers[f.name]] for f in files}}
    judged = metrics.assess(outputs, refs, settings, "merged")
    per = judged["examples"]
    base = per[files[0].name]
    for f in files:
        f.task = judged["scores"][f.name]
        ref = files[0].task
        f.task_ratio = {  # quality metrics only (not an answer's length or truncation)
            k: (v / ref[k] if ref[k] else None) for k, v in f.task.items() if metrics.BY_NAME[k].higher_is_better
        }
        f.flips = metrics.flips(base, per[f.name])
    return {
        "columns": list(outputs),
        "max_tokens": limit,
        "metrics": metrics.by_metric(judged["scores"]),
        "intervals": judged["intervals"],
        "deltas": judged["deltas"],
    }


class Export(Stage):
    name = "export"
    config = ExportConfig
    result = ExportResult
    needs = ("merge", "data", "adapter")
    reads = (
        "name",
        "base_model",
        "data.max_seq_len",
        "eval.response_regex",
        "eval.task",
        "eval.json_schema",
        "eval.max_new_tokens",
    )
    # 2: the gate scores assistant tokens, a shared prefix once, the PPL ratio both ways; 3: the termination proof,
    # task metrics of every artifact's held-out answers; 4: the merged model's too, one table with intervals, answers
    # cut at eval.max_new_tokens as the eval stage generates them; 5: the Modelfile variants without TEMPLATE
    revision = 5

    def run(self, ctx, out: Path) -> ExportResult:
        from .. import metrics

        d = ctx.upstream("data").result
        merged = ctx.upstream("merge")
        adapter = ctx.upstream("adapter")
        return export(
            ctx.cfg,
            ctx.file("merge", merged.result["merged_dir"]),
            ctx.file("data", d["val_file"]),
            ctx.setting("name"),
            ctx.setting("data.max_seq_len"),
            out,
            heldout_file=ctx.file("data", d["heldout_file"]),
            lineage=ctx.key,
            base_model=ctx.setting("base_model"),
            base_dir=ctx.base_dir,
            adapter_dir=ctx.file("adapter", adapter.result["adapter_dir"]),
            calib_file=ctx.file("data", d["train_file"]),
            task_settings=metrics.settings_of(ctx.setting),
            task_tokens=ctx.setting("eval.max_new_tokens"),
        )

    def headline(self, r: dict) -> str:
        return (
            ", ".join(
                f"{f['name']} {f['size_bytes'] / 1e6:.0f}MB" + ("*" if f["name"] == r["selected"] else "")
                for f in r["files"]
            )
            + " (* gate pick)"
        )

    def artifacts(self, r: dict) -> list[Artifact]:
        arts = [Artifact(f["file"], f["file"]) for f in r["files"]]
        if r.get("search"):  # the searched file's per-tensor overrides (llama-quantize --tensor-type-file)
            arts.append(Artifact(r["search"]["overrides_file"], r["search"]["overrides_file"], copy=True))
        lora = r["packaging"].get("lora_adapter")
        if lora:
            arts += [
                Artifact(lora["base_file"], lora["base_file"]),
                Artifact(lora["adapter_file"], lora["adapter_file"]),
            ]
        for mf in ("Modelfile", "Modelfile.adapter"):  # with their template proofs (also when unproven) and variants
            files = (mf, f"{mf}.proof.json", f"{mf}.gguf-template")  # without TEMPLATE: the GGUF's own template
            arts += [Artifact(f, f, copy=True, optional=True) for f in files]
        return arts

    def card_data(self, r: dict, recipe: str) -> dict:
        from .. import metrics

        return {
            **r,
            "task_md": metrics.table(t["metrics"], t["columns"], None, t["intervals"], t["deltas"])
            if (t := r.get("task_table"))
            else None,
            "packaging_md": [s.card(r["packaging"][s.name], recipe) for s in STEPS if s.name in r["packaging"]],
        }
