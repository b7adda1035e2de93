"""Eval stage: validation loss/perplexity and held-out generations, base model vs fine-tuned.

The recipe's `eval.response_regex` states the behaviour fine-tuning should produce; the share of held-out
answers that fully match it (format rate) is compared for the base and the fine-tuned model, together
with exact matches against the held-out reference answers. Also home of the logit helpers that merge and
export use for their equivalence checks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(48, ge=1)
    response_regex: str | None = Field(None, description="a held-out answer that fully matches follows the trained format")
    max_prompts: int = Field(24, ge=1)


class Sample(BaseModel):
    prompt: str
    reference: str
    base: str
    finetuned: str


class EvalResult(BaseModel):
    base_val_loss: float
    ft_val_loss: float
    base_val_perplexity: float
    ft_val_perplexity: float
    prompts: int
    base_format_rate: float | None
    ft_format_rate: float | None
    base_exact_rate: float
    ft_exact_rate: float
    samples: list[Sample]


def format_rate(regex: str | None, texts: list[str]) -> float | None:
    if not regex:
        return None
    pat = re.compile(regex, re.DOTALL)
    return sum(bool(pat.fullmatch(t.strip())) for t in texts) / max(len(texts), 1)


def exact_rate(texts: list[str], refs: list[str]) -> float:
    return sum(t.strip() == r.strip() for t, r in zip(texts, refs)) / max(len(refs), 1)


def check_sequences(tok, val_file: Path, max_tokens: int) -> list[list[int]]:
    """Token sequences of whole validation conversations, up to `max_tokens` in total."""
    from . import data

    seqs, total = [], 0
    for ex in data.read_examples(val_file):
        ids = data.render_example(tok, ex, 4096)["input_ids"]
        if total + len(ids) > max_tokens and seqs:
            break
        seqs.append(ids)
        total += len(ids)
    return seqs


def token_logits(model, seqs: list[list[int]]):
    """fp32 logits at every position of every sequence, concatenated: [total_tokens, vocab]."""
    import torch

    out = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids], device=model.device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return torch.cat(out)


def compare_logits(a, b) -> dict:
    """max/mean absolute difference and top-1 agreement of two [tokens, vocab] logit arrays (torch or numpy)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    diff = np.abs(a - b)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "tokens": int(a.shape[0]),
    }


def response_loss(model, tok, examples: list[dict], max_seq_len: int, batch_size: int = 8) -> float:
    """Mean loss over the tokens training optimizes (assistant turns; every token of text rows)."""
    import torch

    from . import data
    from .train import collate

    rows = [data.render_example(tok, ex, max_seq_len) for ex in examples]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(model.device) for k, v in collate(rows[i : i + batch_size], tok.pad_token_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((labels != -100).sum())
    return total / max(count, 1)


def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 12) -> list[str]:
    """Greedy generations for chat prompts (left-padded batches), decoded without special tokens."""
    import torch

    from . import data

    outs = []
    for i in range(0, len(prompts), batch_size):
        ids = [data.prompt_ids(tok, p) for p in prompts[i : i + batch_size]]
        n = max(map(len, ids))
        x = torch.full((len(ids), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for j, row in enumerate(ids):
            x[j, n - len(row):] = torch.tensor(row)
            mask[j, n - len(row):] = 1
        with torch.no_grad():
            y = model.generate(input_ids=x.to(model.device), attention_mask=mask.to(model.device),
                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
        outs += [tok.decode(row[n:], skip_special_tokens=True).strip() for row in y]
    return outs


def run(cfg: EvalConfig, base_dir: Path, adapter_dir: Path, val_file: Path, heldout_file: Path | None,
        max_seq_len: int) -> EvalResult:
    from peft import PeftModel

    from . import data
    from .train import load_base
    from .util import pick_device

    model, tok = load_base(base_dir, "lora", pick_device())
    model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    val = data.read_examples(val_file)
    held = data.read_split(heldout_file or val_file)  # chat conversations; none for text-only data
    held = held[: cfg.max_prompts]
    prompts, refs = [m[:-1] for m in held], [m[-1]["content"] for m in held]
    ft_loss = response_loss(model, tok, val, max_seq_len)
    ft_out = generate(model, tok, prompts, cfg.max_new_tokens)
    with model.disable_adapter():
        base_loss = response_loss(model, tok, val, max_seq_len)
        base_out = generate(model, tok, prompts, cfg.max_new_tokens)
    return EvalResult(
        base_val_loss=base_loss, ft_val_loss=ft_loss,
        base_val_perplexity=math.exp(min(base_loss, 50)), ft_val_perplexity=math.exp(min(ft_loss, 50)),
        prompts=len(prompts),
        base_format_rate=format_rate(cfg.response_regex, base_out), ft_format_rate=format_rate(cfg.response_regex, ft_out),
        base_exact_rate=exact_rate(base_out, refs), ft_exact_rate=exact_rate(ft_out, refs),
        samples=[Sample(prompt=p[-1]["content"], reference=r, base=b, finetuned=f)
                 for p, r, b, f in zip(prompts, refs, base_out, ft_out)],
    )
