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


def run(cfg: MergeConfig, base_dir: Path, adapter_dir: Path, val_file: Path, out: Path, name: str = "model",
        base_model: str = "", license: str | None = None) -> MergeResult:
    from peft import PeftModel

    from .eval import check_sequences, compare_logits, token_logits
    from .train import load_base
    from .util import pick_device

    check_adapter(adapter_dir, base_dir)
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
    (out / "merged" / "README.md").write_text(model_card(name, base_model, license))
    return MergeResult(merged_dir="merged", max_abs_logit_diff=cmp["max_abs_diff"],
                       mean_abs_logit_diff=cmp["mean_abs_diff"], top1_agreement=cmp["top1_agreement"],
                       tokens_checked=cmp["tokens"])
