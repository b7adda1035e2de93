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

from .errors import FtxError


class WeightedAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Path = Field(description="peft adapter directory trained on the same base")
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


class Diff(BaseModel):
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    mean_kld: float


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


def model_card(name: str, base_model: str, license: str | None) -> str:
    """A Hugging Face model card (README.md) for the merged model; llama.cpp's converter reads its license."""
    head = ["---", f"base_model: {base_model}", "tags: [ftx]"] + ([f"license: {license}"] if license else []) + ["---"]
    return "\n".join(head) + f"\n\n# {name}\n\n{base_model} fine-tuned with ftx and merged (fp32 merge, checked against base+adapter).\n"


def check_adapter(adapter_dir: Path, base_dir: Path) -> None:
    """Fail before loading anything when the adapter's LoRA shapes do not fit the base model's layers
    (an adapter trained on another base), with the first mismatching module named."""
    import json

    from safetensors import safe_open

    from .plan import Arch, arch_of

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FtxError("not a peft adapter directory (no adapter_config.json)", where=str(adapter_dir))
    try:
        arch: Arch = arch_of(str(base_dir))
    except (FtxError, KeyError):
        return  # not a llama-style config: peft's own loading checks remain
    shapes = arch.linear_shapes()
    trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():
            module = key.split(".lora_")[0].rsplit(".", 1)[-1]
            if module not in shapes or not key.endswith(("lora_A.weight", "lora_B.weight")):
                continue
            shape = f.get_slice(key).get_shape()
            got = shape[1] if "lora_A" in key else shape[0]
            want = shapes[module][0] if "lora_A" in key else shapes[module][1]
            if got != want:
                raise FtxError(f"adapter was trained on another base model{f' ({trained_on})' if trained_on else ''}: {module} has "
                               f"{'in' if 'lora_A' in key else 'out'} features {got}, the base {base_dir} has {want}",
                               where=str(adapter_dir))


def diff(a, b) -> Diff:
    """Logit difference of two models on the same tokens; KL(a || b) per token, averaged."""
    import torch

    from .eval import compare_logits

    c = compare_logits(a, b)
    kld = torch.nn.functional.kl_div(torch.log_softmax(b.float(), -1), torch.log_softmax(a.float(), -1),
                                     log_target=True, reduction="none").sum(-1).mean().item()
    return Diff(max_abs_diff=c["max_abs_diff"], mean_abs_diff=c["mean_abs_diff"], top1_agreement=c["top1_agreement"],
                mean_kld=kld)


def mean_nll(logits, seqs: list[list[int]]) -> float:
    """Mean next-token negative log-likelihood; `logits` are the concatenated [tokens, vocab] of `seqs`."""
    import torch

    total, n, off = 0.0, 0, 0
    for ids in seqs:
        lp = torch.log_softmax(logits[off:off + len(ids) - 1].float(), -1)
        total -= lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        n, off = n + len(ids) - 1, off + len(ids)
    return total / n


def qlora_report(base_dir: Path, adapter_dir: Path, seqs, merged_logits, base_logits) -> QloraReport:
    """Rebuild the training-time model (NF4 base + adapter) and compare it with the merge."""
    from peft import PeftModel

    from .eval import token_logits
    from .train import load_base
    from .util import pick_device

    model, _ = load_base(base_dir, "qlora", pick_device())
    base4 = token_logits(model, seqs)
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    trained = token_logits(model, seqs)
    return QloraReport(merged_vs_4bit=diff(trained, merged_logits), base_vs_4bit_base=diff(base4, base_logits),
                       nll_4bit=mean_nll(trained, seqs), nll_merged=mean_nll(merged_logits, seqs))


def run(cfg: MergeConfig, base_dir: Path, adapter_dir: Path, val_file: Path, out: Path, name: str = "model",
        base_model: str = "", license: str | None = None, method: str = "lora") -> MergeResult:
    from peft import PeftModel

    from .eval import check_sequences, compare_logits, token_logits
    from .train import load_base
    from .util import pick_device

    extra = cfg.combine.adapters if cfg.combine else []
    for a in [adapter_dir] + [a.path for a in extra]:
        check_adapter(a, base_dir)
    model, tok = load_base(base_dir, "lora", pick_device())
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
            model.add_weighted_adapter(names, [u["weight"] for u in used], "combined",
                                       combination_type=cfg.combine.method)
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
        raise FtxError(f"merged model differs from base+adapter: max |logit diff| {cmp['max_abs_diff']:.2e} "
                       f"> merge.max_logit_diff {cfg.max_logit_diff:.0e}")
    merged.save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    (out / "merged" / "README.md").write_text(model_card(name, base_model, license))
    del merged, model
    qlora = qlora_report(base_dir, adapter_dir, seqs, after, base_logits) if method == "qlora" and not extra else None
    return MergeResult(merged_dir="merged", max_abs_logit_diff=cmp["max_abs_diff"],
                       mean_abs_logit_diff=cmp["mean_abs_diff"], top1_agreement=cmp["top1_agreement"],
                       tokens_checked=cmp["tokens"], adapters=used if extra else [], qlora=qlora)
