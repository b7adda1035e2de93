"""Merge stage: fold a LoRA adapter (or a weighted combination of several) into the base weights and prove
the result is the same model.

The merge runs in fp32 on CPU (bf16 on CUDA). Before saving, the merged model's logits on validation
tokens are compared with base+adapter (peft, unmerged); above `max_logit_diff` the stage fails.

QLoRA: the adapter was trained against the NF4-quantized base but is merged onto the full-precision base,
which is a different model. The stage measures that difference (merged vs 4-bit base + adapter, and for
scale the 4-bit base vs the full-precision base) and reports it; it does not fail on it.

Several adapters (`merge.combine`): peft's add_weighted_adapter. The default combination `cat` stacks the
LoRA matrices, so the result is exactly W + sum_i w_i * s_i * B_i A_i (s_i: adapter i's alpha/r); `linear`
and `svd` are peft's approximations (linear needs equal ranks). The same equivalence check applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.config import InputDir
from ..core.errors import FtxError
from ..core.models import Diff
from ..stage import Artifact, Stage


class WeightedAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: InputDir = Field(description="peft adapter directory trained on the same base, relative to the recipe")
    weight: float = 1.0


class Combine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, description="weight of this recipe's own adapter")
    adapters: list[WeightedAdapter] = Field(min_length=1, description="further adapters to add")
    method: Literal["cat", "linear", "svd"] = Field("cat", description="cat is exact; linear/svd approximate")


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_logit_diff: float = Field(1e-3, gt=0, description="fail if merged vs base+adapter logits differ more")
    check_tokens: int = Field(512, ge=16)
    combine: Combine | None = Field(None, description="merge a weighted combination of several adapters")


class QloraReport(BaseModel):
    """The model the QLoRA adapter was trained with (NF4 base + adapter) vs what is shipped (the merge)."""

    merged_vs_4bit: Diff
    base_vs_4bit_base: Diff = Field(description="for scale: what NF4 alone changes in the base model")
    nll_4bit: float = Field(description="mean next-token NLL of the training-time model on the check tokens")
    nll_merged: float = Field(description="the same for the merged model")


class MergeResult(BaseModel):
    merged_dir: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    tokens_checked: int
    adapters: list[dict] = Field(default_factory=list, description="combined adapters with their weights")
    qlora: QloraReport | None = None
    adapter: dict | None = Field(
        None, description="what the adapter holds and, per target (merge, GGUF LoRA, Ollama, vLLM), whether it loads"
    )


def model_card(name: str, base_model: str, license: str | None) -> str:
    """A Hugging Face model card (README.md) for the merged model; llama.cpp's converter reads its license."""
    head = ["---", f"base_model: {base_model}", "tags: [ftx]"] + ([f"license: {license}"] if license else []) + ["---"]
    return (
        "\n".join(head)
        + f"\n\n# {name}\n\n{base_model} fine-tuned with ftx and merged (fp32 merge, checked against base+adapter).\n"
    )


def qlora_report(base_dir: Path, adapter_dir: Path, seqs, merged_logits, base_logits) -> QloraReport:
    """Rebuild the training-time model (NF4 base + adapter) and compare it with the merge."""
    from peft import PeftModel

    from ..core.models import load_base, logit_diff, mean_nll, pick_device, token_logits

    model, _ = load_base(base_dir, "qlora", pick_device())
    base4 = token_logits(model, seqs)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    trained = token_logits(model, seqs)
    return QloraReport(
        merged_vs_4bit=logit_diff(trained, merged_logits),
        base_vs_4bit_base=logit_diff(base4, base_logits),
        nll_4bit=mean_nll(trained, seqs),
        nll_merged=mean_nll(merged_logits, seqs),
    )


def merge(
    cfg: MergeConfig,
    base_dir: Path,
    adapter_dir: Path,
    val_file: Path,
    out: Path,
    name: str = "model",
    base_model: str = "",
    license: str | None = None,
    method: str = "lora",
) -> MergeResult:
    from peft import PeftModel

    from ..core.adapters import check_fits_base, portability
    from ..core.models import check_sequences, compare_logits, load_base, pick_device, token_logits

    extra = cfg.combine.adapters if cfg.combine else []
    for a in [adapter_dir] + [a.path for a in extra]:
        check_fits_base(a, base_dir)
    model, tok = load_base(base_dir, "lora", pick_device())
    report = portability(adapter_dir, method == "qlora", bool(getattr(model.config, "tie_word_embeddings", False)))
    seqs = check_sequences(tok, val_file, cfg.check_tokens)
    base_logits = token_logits(model, seqs) if method == "qlora" else None
    model = PeftModel.from_pretrained(model, adapter_dir, adapter_name="a0")
    used = [{"path": str(adapter_dir), "weight": cfg.combine.weight if cfg.combine else 1.0}]
    if cfg.combine:
        for i, a in enumerate(extra, 1):
            model.load_adapter(a.path, adapter_name=f"a{i}")
            used.append({"path": str(a.path), "weight": a.weight})
        names = [f"a{i}" for i in range(len(used))]
        try:
            model.add_weighted_adapter(
                names, [u["weight"] for u in used], "combined", combination_type=cfg.combine.method
            )
        except ValueError as e:
            raise FtxError(f"merge.combine: {e}") from None
        model.set_adapter("combined")
        for n in names:
            model.delete_adapter(n)
    model.eval()
    before = token_logits(model, seqs)
    merged = model.merge_and_unload()
    after = token_logits(merged, seqs)
    cmp = compare_logits(before, after)
    if cmp["max_abs_diff"] > cfg.max_logit_diff:
        raise FtxError(
            f"merged model differs from base+adapter: max |logit diff| {cmp['max_abs_diff']:.2e} "
            f"> merge.max_logit_diff {cfg.max_logit_diff:.0e}"
        )
    merged.save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    (out / "merged" / "README.md").write_text(model_card(name, base_model, license))
    del merged, model
    qlora = qlora_report(base_dir, adapter_dir, seqs, after, base_logits) if method == "qlora" and not extra else None
    return MergeResult(
        merged_dir="merged",
        max_abs_logit_diff=cmp["max_abs_diff"],
        mean_abs_logit_diff=cmp["mean_abs_diff"],
        top1_agreement=cmp["top1_agreement"],
        tokens_checked=cmp["tokens"],
        adapters=used if extra else [],
        qlora=qlora,
        adapter=report,
    )


class Merge(Stage):
    name = "merge"
    config = MergeConfig
    result = MergeResult
    needs = ("adapter", "data")
    reads = ("name", "base_model", "license", "train.method")
    revision = 2  # 2: the adapter report

    def validate(self, recipe, doc) -> None:
        for i, a in enumerate(recipe.merge.combine.adapters if recipe.merge.combine else []):
            if not (a.path / "adapter_config.json").is_file():
                raise doc.fail(("merge", "combine", "adapters", i, "path"), f"not a peft adapter directory: {a.path}")

    def run(self, ctx, out: Path) -> MergeResult:
        from ..core import basemodel

        base_model = ctx.setting("base_model")
        license = ctx.setting("license") or basemodel.LICENSES.get(base_model)
        adapter = ctx.upstream("adapter")
        return merge(
            ctx.cfg,
            ctx.base_dir,
            ctx.file("adapter", adapter.result["adapter_dir"]),
            ctx.file("data", ctx.upstream("data").result["val_file"]),
            out,
            ctx.setting("name"),
            base_model,
            license,
            ctx.setting("train.method"),
        )

    def headline(self, r: dict) -> str:
        return f"max |logit diff| {r['max_abs_logit_diff']:.1e}"

    def artifacts(self, r: dict) -> list[Artifact]:
        return [Artifact(r["merged_dir"], "merged")]
