"""Memory planner: estimate the peak memory of a fine-tuning run before starting it (`ftx plan`).

peak = runtime + weights + adapter + optimizer state + max(activations + logits, gradients)

(gradients appear during backward while the activations of the same layers are being released, and are
dropped after each optimizer step, so the two do not peak together.)

Every term is computed from the model's architecture (config.json, or the table of known models below);
the formulas and their sources are in docs/memory_planner.md. On CUDA the estimate is for the GPU (what
`torch.cuda.max_memory_allocated` plus the CUDA context would show); on CPU it is the process's peak RSS,
which is what the planner is validated against here (tests/test_plan.py, bench/plan_accuracy.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .core.arch import Arch, arch_of
from .core.errors import FtxError

MiB = 2**20

# Fixed costs measured on this project's stack (see docs/memory_planner.md):
# CPU: RSS of a Python process with torch, transformers, peft and trl imported, before loading a model (440 MB).
CPU_RUNTIME_MB = 450.0
# CUDA: the CUDA context + cuBLAS/cuDNN workspaces, commonly 0.5-1 GB; the upper figure is used.
CUDA_RUNTIME_MB = 1024.0
# bitsandbytes NF4 with double quantization: 4 bits + 8-bit absmax per 64 weights + fp32 absmax of those per 256
# blocks = 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (QLoRA paper, section 3).
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# Bytes per token per vocabulary entry held around the loss. CUDA (derived): bf16 logits (2), their fp32
# upcast (4), log-softmax (4), its gradient (4) and the bf16 logits gradient (2) = 16. CPU (measured, peak
# RSS): ~7.5 fp32 logits-sized buffers = 30; freed buffers are not returned to the OS between forward and
# backward, so peak RSS sees more copies than are ever alive at once.
LOGITS_BYTES = {"cuda": 16, "cpu": 30}


class PlanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="a known model name, a packaged ftx model or a local dir with config.json")
    method: Literal["full", "lora", "qlora"] = "qlora"
    seq_len: int = Field(2048, ge=1, description="tokens per row (the longest row of a batch)")
    batch_size: int = Field(1, ge=1)
    lora_r: int = Field(16, ge=1)
    target_modules: Literal["all-linear", "attention", "mlp"] = "all-linear"
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when this machine has it, else CPU")
    strategy: Literal["single", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "single", description="how training is spread over world_size devices (the estimate is per device)"
    )
    world_size: int = Field(1, ge=1, description="devices (GPUs, or CPU processes) training together")
    budget_gb: float | None = Field(
        None,
        gt=0,
        description="memory available (default: the GPU's memory; CPU: this "
        "machine's RAM; CUDA asked for without a GPU here: an RTX 4090's 24 GB)",
    )


class Plan(BaseModel):
    config: PlanConfig
    arch: Arch
    params: int
    trainable_params: int
    terms_mb: dict[str, float]
    total_mb: float
    budget_mb: float
    fits: bool
    max_batch_size: int = Field(description="largest batch that fits the budget at this seq_len (0: none)")


def machine(device: str, budget_gb: float | None) -> tuple[str, float]:
    """The device and memory budget to plan for: `auto` is this machine's accelerator; the budget defaults to its
    memory (an RTX 4090's 24 GB when CUDA is asked for on a machine without it)."""
    import importlib.util

    cuda = False
    if device in ("auto", "cuda") and importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if device == "auto" else device
    if budget_gb is None:
        if device == "cuda":
            budget_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 24.0
        else:
            import psutil

            budget_gb = psutil.virtual_memory().total / 2**30
    return device, budget_gb


def data_lengths(recipe) -> list[int]:
    """Token lengths of the recipe's training rows with the base model's chat template (capped at max_seq_len)."""
    from transformers import AutoTokenizer

    from .core import basemodel, chat
    from .core.rows import load

    tok = AutoTokenizer.from_pretrained(basemodel.resolve(recipe.base_model))
    examples, _ = load(recipe.data.path, recipe.data.format, "skip", options=recipe.data.options())
    msl = recipe.data.max_seq_len
    return [len(chat.render_example(tok, ex, msl)["input_ids"]) for ex in examples if "prompt" not in ex]


def batch_seq_len(lengths: list[int], batch_size: int, trials: int = 500, seed: int = 0) -> int:
    """The expected longest row of a random batch: what a batch padded to its longest row holds per row."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arr = np.asarray(lengths)
    return int(np.ceil(np.mean([arr[rng.integers(0, len(arr), size=batch_size)].max() for _ in range(trials)])))


def recipe_plan_config(recipe, device: str) -> dict:
    """PlanConfig fields for a recipe's train stage (explicit target lists are planned as all-linear); seq_len is
    every row at max_seq_len (the worst case)."""
    t = recipe.train
    dist = t.distributed
    world = dist.world_size if dist else 1
    eight_bit = t.optimizer in ("adamw_8bit", "paged_adamw_8bit") or (
        t.optimizer == "auto" and t.method == "qlora" and device == "cuda"
    )  # train.pick_optimizer's auto
    return {
        "model": recipe.base_model,
        "method": t.method,
        "seq_len": recipe.data.max_seq_len,
        "batch_size": max(1, t.batch_size // world),  # the recipe's batch is over all workers
        "strategy": dist.strategy if dist else "single",
        "world_size": world,
        "lora_r": t.lora.r,
        "gradient_checkpointing": t.gradient_checkpointing,
        "target_modules": t.lora.target_modules if isinstance(t.lora.target_modules, str) else "all-linear",
        "optimizer": "adamw_8bit" if eight_bit else "adamw",
    }


def targets(arch: Arch, preset: str) -> list[str]:
    names = list(arch.linear_shapes())
    return {"all-linear": names, "attention": names[:4], "mlp": names[4:]}[preset]


def estimate(cfg: PlanConfig, batch_size: int | None = None) -> tuple[dict[str, float], int, int]:
    """Memory terms in MiB, total parameters and trainable parameters. See docs/memory_planner.md."""
    a = arch_of(cfg.model)
    b = batch_size or cfg.batch_size
    p = a.params()
    cpu = cfg.device == "cpu"
    wbytes = 4 if cpu else 2  # fp32 on CPU, bf16 on CUDA (ftx.util.train_dtype)
    shapes = a.linear_shapes()
    lora = a.layers * sum(cfg.lora_r * (i + o) for n, (i, o) in shapes.items() if n in targets(a, cfg.target_modules))
    trainable = p["total"] if cfg.method == "full" else lora
    terms = {"runtime": CPU_RUNTIME_MB if cpu else CUDA_RUNTIME_MB}
    if cfg.method == "qlora":  # linear layers in NF4; embeddings, head and norms stay in the compute dtype
        terms["weights"] = (p["linear"] * NF4_BITS / 8 + (p["embed"] + p["norms"]) * wbytes) / MiB
    else:
        terms["weights"] = p["total"] * wbytes / MiB
    # trainable weights: LoRA matrices are kept in fp32 (peft's autocast_adapter_dtype); full FT trains the
    # weights above in place. Gradients in the dtype of the trainable weights. AdamW: 2 fp32 states per
    # trainable weight (8-bit AdamW: 2 bytes); paged optimizers move these to CPU RAM under pressure only.
    grad_bytes = wbytes if cfg.method == "full" else 4
    terms["adapter"] = 0.0 if cfg.method == "full" else lora * 4 / MiB
    terms["gradients"] = trainable * grad_bytes / MiB
    terms["optimizer"] = trainable * (2 if cfg.optimizer == "adamw_8bit" else 8) / MiB
    # activations kept for backward, per token per layer (elements): block inputs and the two norm outputs
    # (3h), q/k/v after RoPE and the attention output (q + 2kv + q), o_proj output added to the residual (h),
    # gate, up, silu(gate) and their product (4i). With SDPA/flash attention no seq x seq scores are kept.
    per_tok_layer = 3 * a.hidden + 2 * a.q_dim + 2 * a.kv_dim + a.hidden + 4 * a.intermediate
    tokens = b * cfg.seq_len
    if cfg.gradient_checkpointing:  # only each block's input is kept; one block is recomputed at a time
        act = tokens * (a.layers * a.hidden + per_tok_layer) * wbytes
    else:
        act = tokens * a.layers * per_tok_layer * wbytes
    terms["activations"] = act / MiB
    terms["logits"] = tokens * a.vocab * LOGITS_BYTES[cfg.device] / MiB
    if cfg.method == "qlora":  # dequantized weights for the matmuls: all of them on CPU (bitsandbytes' CPU path,
        # measured), one block at a time on CUDA
        terms["dequant"] = (p["linear"] if cpu else p["linear"] / a.layers) * wbytes / MiB
    return _shard(terms, cfg, a, p, wbytes), p["total"], trainable


def _shard(terms: dict[str, float], cfg: PlanConfig, a: Arch, p: dict, wbytes: int) -> dict[str, float]:
    """Per-device terms under a distributed strategy (docs/memory_planner.md, "Several devices"):
    ddp: everything replicated, plus DDP's gradient buckets (a second copy of the gradients); ZeRO-2: gradients and
    optimizer state / N; ZeRO-3 and FSDP (full shard): weights, adapter, gradients and optimizer state / N, plus
    the layers gathered for compute (the current one and the one prefetched)."""
    n = cfg.world_size
    if cfg.strategy == "single" or n == 1:
        return terms
    t = dict(terms)
    if cfg.strategy == "ddp":
        t["ddp_buckets"] = t["gradients"]
        return t
    t["gradients"] /= n
    t["optimizer"] /= n
    if cfg.strategy in ("fsdp", "deepspeed_zero3"):
        t["gathered_layers"] = 2 * t["weights"] / a.layers
        t["weights"] /= n
        t["adapter"] /= n
    return t


def total_mb(terms: dict[str, float]) -> float:
    """Combine the terms: gradients and activations do not peak together (module docstring)."""
    t = dict(terms)
    flow = t.pop("activations") + t.pop("logits") + t.pop("dequant", 0.0)
    return sum(v for k, v in t.items() if k != "gradients") + max(flow, t["gradients"])


def plan(cfg: PlanConfig) -> Plan:
    device, budget = machine(cfg.device, cfg.budget_gb)
    cfg = cfg.model_copy(update={"device": device, "budget_gb": budget})
    terms, params, trainable = estimate(cfg)
    total = total_mb(terms)
    budget = cfg.budget_gb * 1024
    fits = total <= budget
    max_b = 0
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if total_mb(estimate(cfg, b)[0]) <= budget:
            max_b = b
    return Plan(
        config=cfg,
        arch=arch_of(cfg.model),
        params=params,
        trainable_params=trainable,
        terms_mb={k: round(v, 1) for k, v in terms.items()},
        total_mb=round(total, 1),
        budget_mb=budget,
        fits=fits,
        max_batch_size=max_b,
    )


# ------------------------------------------------------------------------------------------- measuring (CPU)


def measure(
    base_dir: Path,
    method: str,
    seq_len: int,
    batch_size: int,
    lora_r: int = 8,
    gradient_checkpointing: bool = False,
    steps: int = 2,
) -> dict:
    """Run `steps` real training steps (forward, backward, AdamW step) on rows of exactly seq_len tokens in a
    fresh process and return its peak RSS in MiB. CPU only: this is what the planner is validated against."""
    spec = json.dumps(
        {
            "base_dir": str(base_dir),
            "method": method,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "lora_r": lora_r,
            "gradient_checkpointing": gradient_checkpointing,
            "steps": steps,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", f"from ftx.plan import _child; _child({spec!r})"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise FtxError(f"measuring peak memory failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(spec_json: str) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the baseline reading, like a real run)
    import trl  # noqa: F401
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from .core.models import load_base
    from .core.usage import peak_rss_mb

    spec = json.loads(spec_json)
    baseline = peak_rss_mb()
    torch.manual_seed(0)
    method = spec["method"]
    model, _ = load_base(Path(spec["base_dir"]), "qlora" if method == "qlora" else "lora", "cpu")
    model.config.use_cache = False
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["gradient_checkpointing"])
    if method != "full":
        model = get_peft_model(
            model,
            LoraConfig(
                r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], target_modules="all-linear", task_type="CAUSAL_LM"
            ),
        )
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model.config.vocab_size
    for _ in range(spec["steps"]):
        ids = torch.randint(10, vocab, (spec["batch_size"], spec["seq_len"]))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = peak_rss_mb()
    print(json.dumps({"peak_rss_mb": peak, "baseline_rss_mb": baseline}))
