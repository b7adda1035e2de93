"""Merge stage: fold a LoRA adapter into the base weights and prove the result is the same model.

The merge runs in fp32 on CPU (bf16 on CUDA). Before saving, the merged model's logits on validation
tokens are compared with base+adapter (peft, unmerged); above `max_logit_diff` the stage fails.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .errors import FtxError


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_logit_diff: float = Field(1e-3, gt=0, description="fail if merged vs base+adapter logits differ more")
    check_tokens: int = Field(512, ge=16)


class MergeResult(BaseModel):
    merged_dir: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    top1_agreement: float
    tokens_checked: int


def run(cfg: MergeConfig, base_dir: Path, adapter_dir: Path, val_file: Path, out: Path) -> MergeResult:
    from peft import PeftModel

    from .eval import check_sequences, compare_logits, token_logits
    from .train import load_base
    from .util import pick_device

    model, tok = load_base(base_dir, "lora", pick_device())
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    seqs = check_sequences(tok, val_file, cfg.check_tokens)
    before = token_logits(model, seqs)
    merged = model.merge_and_unload()
    after = token_logits(merged, seqs)
    cmp = compare_logits(before, after)
    if cmp["max_abs_diff"] > cfg.max_logit_diff:
        raise FtxError(f"merged model differs from base+adapter: max |logit diff| {cmp['max_abs_diff']:.2e} "
                       f"> merge.max_logit_diff {cfg.max_logit_diff:.0e}")
    merged.save_pretrained(out / "merged")
    tok.save_pretrained(out / "merged")
    return MergeResult(merged_dir="merged", max_abs_logit_diff=cmp["max_abs_diff"],
                       mean_abs_logit_diff=cmp["mean_abs_diff"], top1_agreement=cmp["top1_agreement"],
                       tokens_checked=cmp["tokens"])
