"""The prepared GPU check (`scripts/gpu_check.sh`): what ftx can only measure on a CUDA GPU, in one run of a few
minutes, written to one JSON.

    hf-lora      LoRA training of a small Llama (SmolLM2-135M's shape, random weights: nothing to download) with
                 transformers + peft in bf16, as the train stage does on CUDA: tokens/s and peak memory
    hf-qlora     the same with the base in NF4 (bitsandbytes), when bitsandbytes is installed
    unsloth      the same through Unsloth's FastLanguageModel, when unsloth is installed (CUDA only)
and for each, the memory planner's estimate (ftx.plan) against the measured peak: torch's peak allocation on CUDA
(the planner's total without its fixed CUDA-context term), the process's peak RSS on CPU.

`--dry-run` runs the same code on CPU with a tiny model of the same family (fp32, a few steps): the tests run it.
Only torch, transformers, peft, pydantic and numpy are needed (plus bitsandbytes / unsloth for their rows); run
from the repository with PYTHONPATH=src, ftx itself need not be installed.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

SMOL = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=512, tie_word_embeddings=True,
)  # fmt: skip


def make_base(dry: bool, where: Path) -> Path:
    """A random-weight Llama saved as an HF directory (so that every backend loads it the same way)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**(TINY if dry else SMOL), max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(where, safe_serialization=True)
    return where


def _load(backend: str, base: Path, device: str, seq_len: int, r: int):
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(str(base), max_seq_length=seq_len, dtype=dtype)
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return FastLanguageModel.get_peft_model(model, r=r, lora_alpha=2 * r, target_modules=names)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if backend == "hf-qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if backend != "hf-qlora":
        model.to(device)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))


def train_run(backend: str, base: Path, device: str, steps: int, batch: int, seq_len: int, r: int = 16) -> dict:
    """LoRA steps on random tokens: tokens/s after 2 warm-up steps, peak memory, the planner's estimate."""
    import torch

    from .core.usage import peak_memory_mb
    from .plan import PlanConfig, estimate, total_mb

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = _load(backend, base, device, seq_len, r)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    losses, t0, warm = [], None, 2
    for step in range(steps + warm):
        if step == warm:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    method = "qlora" if backend == "hf-qlora" else "lora"
    cfg = PlanConfig(model=str(base), method=method, seq_len=seq_len, batch_size=batch, lora_r=r, device=device)
    terms, _, trainable = estimate(cfg)
    planned = total_mb(terms)
    measured = peak_memory_mb(device)
    # on CUDA the planner's total includes the CUDA context, which torch's allocator does not count
    comparable = planned - (terms["runtime"] if device == "cuda" else 0.0)
    del model, opt
    return {
        "backend": backend,
        "steps": steps,
        "batch": batch,
        "seq_len": seq_len,
        "tokens_per_s": steps * batch * seq_len / elapsed,
        "peak_memory_mb": measured,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS",
        "planner_mb": comparable,
        "planner_over_measured": comparable / measured if measured else None,
        "trainable_params": trainable,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def check(dry_run: bool = False, out: Path | None = None) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    if device == "cpu" and not dry_run:
        raise SystemExit("no CUDA GPU here: run with --dry-run to try the code path on CPU")
    t0 = time.perf_counter()
    shape = dict(steps=3, batch=2, seq_len=32) if dry_run else dict(steps=20, batch=8, seq_len=512)
    result = {
        "dry_run": dry_run,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "gpu_memory_mb": torch.cuda.get_device_properties(0).total_memory / 2**20 if device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "packages": {m: _version(m) for m in ("transformers", "peft", "accelerate", "bitsandbytes", "unsloth")},
        "model": "Llama, SmolLM2-135M's shape, random weights" if not dry_run else "tiny Llama (2 layers, 64 wide)",
        "runs": [],
        "skipped": {},
    }
    backends = ["hf-lora", "hf-qlora", "unsloth"]
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(dry_run, Path(tmp) / "base")
        for backend in backends:
            why = _unavailable(backend, device)
            if why:
                result["skipped"][backend] = why
                continue
            result["runs"].append(train_run(backend, base, device, **shape))
    result["elapsed_s"] = time.perf_counter() - t0
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


def _unavailable(backend: str, device: str) -> str | None:
    if backend == "hf-qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if backend == "unsloth":
        if device != "cuda":
            return "Unsloth needs a CUDA GPU"
        if importlib.util.find_spec("unsloth") is None:
            return "unsloth is not installed"
    return None


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, a few steps (the tests)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = ap.parse_args(argv)
    r = check(args.dry_run, args.out)
    for run in r["runs"]:
        print(
            f"{run['backend']:9s} {run['tokens_per_s']:10.0f} tok/s  peak {run['peak_memory_mb']:8.0f} MB  "
            f"planner {run['planner_mb']:8.0f} MB ({run['planner_over_measured']:.2f}x)"
        )
    for name, why in r["skipped"].items():
        print(f"{name:9s} skipped: {why}")
    print(f"wrote {args.out} ({r['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
