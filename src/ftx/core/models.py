"""Loading models and comparing them: the base model (full precision or NF4), logits on token sequences, logit
and KL comparisons, held-out generation and the response-token loss. Every stage that checks one model against
another (merge, export, eval, the serve check) uses these, so their figures are computed the same way.

fp32 on CPU (bf16/fp16 matmuls are ~100x slower there), bf16 on CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import BaseModel

# transformers' SchedulerType values (lr_scheduler_type): recipes are checked against these when they load
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_dtype(device: str):
    """fp32 on CPU (bf16 matmuls are ~100x slower there), bf16 on CUDA."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def load_base(base_dir: Path, method: str = "lora", device: str = "cpu"):
    """(model, tokenizer) in eval mode: full precision (`lora`, `full`) or NF4 with double quantization
    (`qlora`, bitsandbytes), in the compute dtype of `device`; flash-attention on CUDA when installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    kwargs = {"dtype": train_dtype(device)}
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        kwargs["attn_implementation"] = "flash_attention_2"
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=train_dtype(device),
        )
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if method != "qlora":  # bitsandbytes places 4-bit weights itself
        model.to(device)
    model.eval()
    return model, tok


def check_sequences(tok, val_file: Path, max_tokens: int) -> list[list[int]]:
    """Token sequences of whole validation conversations, up to `max_tokens` in total."""
    from . import chat

    seqs, total = [], 0
    for ex in chat.read_examples(val_file):
        ids = chat.render_example(tok, ex, 4096)["input_ids"]
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


class Diff(BaseModel):
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    mean_kld: float


def logit_diff(a, b) -> Diff:
    """Logit difference of two models on the same tokens; KL(a || b) per token, averaged (torch tensors)."""
    import torch

    c = compare_logits(a, b)
    kld = (
        torch.nn.functional.kl_div(
            torch.log_softmax(b.float(), -1), torch.log_softmax(a.float(), -1), log_target=True, reduction="none"
        )
        .sum(-1)
        .mean()
        .item()
    )
    return Diff(
        max_abs_diff=c["max_abs_diff"],
        mean_abs_diff=c["mean_abs_diff"],
        top1_agreement=c["top1_agreement"],
        mean_kld=kld,
    )


def mean_nll(logits, seqs: list[list[int]]) -> float:
    """Mean next-token negative log-likelihood; `logits` are the concatenated [tokens, vocab] of `seqs`."""
    import torch

    total, n, off = 0.0, 0, 0
    for ids in seqs:
        lp = torch.log_softmax(logits[off : off + len(ids) - 1].float(), -1)
        total -= lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        n, off = n + len(ids) - 1, off + len(ids)
    return total / n


def response_loss(model, tok, examples: list[dict], max_seq_len: int, batch_size: int = 8) -> float:
    """Mean loss over the tokens training optimizes (assistant turns; every token of text rows)."""
    import torch

    from . import chat

    rows = [chat.render_example(tok, ex, max_seq_len) for ex in examples]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(model.device) for k, v in chat.collate(rows[i : i + batch_size], tok.pad_token_id).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((labels != -100).sum())
    return total / max(count, 1)


def generate(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 32) -> list:
    """Greedy generations for chat prompts (left-padded batches), decoded without special tokens, as
    chat.Answer: the text, the tokens generated (the end token included) and whether it ran to max_new_tokens."""
    import torch

    from . import chat

    outs = []
    for i in range(0, len(prompts), batch_size):
        ids = [chat.prompt_ids(tok, p) for p in prompts[i : i + batch_size]]
        n = max(map(len, ids))
        x = torch.full((len(ids), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for j, row in enumerate(ids):
            x[j, n - len(row) :] = torch.tensor(row)
            mask[j, n - len(row) :] = 1
        with torch.no_grad():
            y = model.generate(
                input_ids=x.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        for row in y[:, n:].tolist():
            ended = [i for i, t in enumerate(row) if t == tok.eos_token_id or t == tok.pad_token_id]
            length = ended[0] + 1 if ended else len(row)
            text = tok.decode(row[:length], skip_special_tokens=True).strip()
            outs.append(chat.Answer.of(text, tokens=length, truncated=not ended))
    return outs
