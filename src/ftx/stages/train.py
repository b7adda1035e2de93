"""Train stage: LoRA / QLoRA fine-tuning with transformers + peft (or Unsloth on CUDA).

fp32 on CPU (bf16 matmuls are ~100x slower there), bf16 on CUDA. With a varlen attention kernel
(flash-attention) a batch is packed into one row without padding: position ids restart at every example and
the attention mask is block-diagonal, so no example attends to another (see `collate_packed`); otherwise a
batch is padded to its longest row. The loss covers assistant turns only.
Writes: adapter/ (standard peft format, whichever backend trained it), metrics.jsonl, loss.png.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core import launch
from ..core.errors import FtxError
from ..core.launch import DistributedConfig
from ..core.models import SCHEDULERS
from ..stage import Artifact, Stage


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear", "attention", "mlp"] | list[str] = Field(
        "all-linear",
        description="a preset (all-linear: every linear layer but the output head; attention: "
        "q/k/v/o projections; mlp: the feed-forward layers) or module names",
    )


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["lora", "qlora"] = Field("lora", description="qlora: the base model in NF4 (bitsandbytes)")
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="auto: Unsloth when CUDA and the `gpu` extra are present, else transformers+peft"
    )
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(1e-3, gt=0)
    scheduler: Literal[SCHEDULERS] = Field("cosine", description="learning-rate schedule (transformers' names)")
    warmup_steps: int = Field(10, ge=0)
    max_steps: int = Field(100, ge=1)
    epochs: float | None = Field(None, gt=0, description="passes over the train split; replaces max_steps when set")
    batch_size: int = Field(
        8, ge=1, description="examples per step before gradient accumulation, over all workers when distributed"
    )
    grad_accum: int = Field(1, ge=1)
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="true: pack each batch into one row without padding (no cross-example attention); "
        "false: pad each batch to its longest row; auto: pack when the attention kernel is "
        "varlen (flash-attention), where packing wastes nothing",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~30% more time"
    )
    optimizer: Literal["auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "auto", description="auto: paged_adamw_8bit for QLoRA on CUDA, adamw_torch otherwise"
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="also log to TensorBoard (<output_dir>/tensorboard) and/or an MLflow "
        "file store (<output_dir>/mlruns)",
    )
    eval_every: int = Field(20, ge=1, description="validation loss every N steps")
    save_every: int | None = Field(None, ge=1, description="checkpoint cadence in steps (default: eval_every)")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="evals without val-loss improvement before stopping; the best checkpoint is kept"
    )
    seed: int = 0
    distributed: DistributedConfig | None = Field(
        None,
        description="train through torchrun/accelerate with several workers (DDP, FSDP, DeepSpeed ZeRO); "
        "the other stages run once",
    )


class TrainResult(BaseModel):
    adapter_dir: str
    steps: int
    train_loss: float = Field(description="mean training loss over all steps")
    final_loss: float | None = Field(None, description="the last logged training loss")
    val_loss: float
    val_perplexity: float
    trained_tokens: int
    tokens_per_s: float
    device: str
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from_step: int | None = None
    backend: str = "hf"
    target_modules: list[str] = []
    trainable_params: int = 0
    optimizer: str = "adamw_torch"
    packing: bool = False
    peak_memory_mb: float = 0.0
    world_size: int = Field(1, description="training workers (distributed: all nodes' processes)")
    strategy: str | None = Field(None, description="ddp, fsdp, deepspeed_zero2/3 when distributed")
    wrapper: str | None = Field(None, description="what wrapped the model in training (proves the strategy ran)")


def collate_packed(batch: list[dict]) -> dict:
    """Padding-free batching: the rows of a batch are concatenated into one sequence; position ids restart at
    each row. With no attention mask, transformers derives a block-diagonal causal mask from the position ids
    (flash-attention varlen on CUDA, a packed-sequence mask for SDPA/eager), so rows never attend to each other.
    The first label of each row is masked: nothing before it belongs to the same example."""
    import torch

    ids, labels, pos = [], [], []
    for b in batch:
        ids += b["input_ids"]
        labels += [-100] + list(b["labels"][1:])
        pos += range(len(b["input_ids"]))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos])}


def target_modules(model, spec: str | list[str]) -> list[str]:
    """Resolve a preset to the leaf names of the model's linear layers (never the output head)."""
    import torch

    head = model.get_output_embeddings()
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if isinstance(spec, list):
        missing = [t for t in spec if t not in leaves]
        if missing:
            raise FtxError(
                f"train.lora.target_modules: {', '.join(missing)} not in this model's linear layers "
                f"({', '.join(leaves)})"
            )
        return spec
    if spec == "all-linear":
        return leaves
    parent = {"attention": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}[spec]
    picked = sorted({n.rsplit(".", 1)[-1] for n in linear if any(p in n.rsplit(".", 2)[-2] for p in parent)})
    if not picked:
        raise FtxError(
            f"train.lora.target_modules: preset {spec!r} matches no layer of this model ({', '.join(leaves)})"
        )
    return picked


def pick_backend(cfg: TrainConfig, device: str) -> str:
    if cfg.backend == "unsloth" and device != "cuda":
        raise FtxError("train.backend: unsloth needs a CUDA GPU (it refuses to import without one); use auto or hf")
    if cfg.backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
        raise FtxError("train.backend: unsloth is not installed: pip install 'ftx[gpu]'")
    if cfg.backend == "auto":
        return "unsloth" if device == "cuda" and importlib.util.find_spec("unsloth") is not None else "hf"
    return cfg.backend


def pick_optimizer(cfg: TrainConfig, device: str) -> str:
    if cfg.optimizer.startswith("paged_") and device != "cuda":
        raise FtxError(
            f"train.optimizer: {cfg.optimizer} pages optimizer state between GPU and CPU memory and "
            "needs CUDA; use adamw_torch (or auto)"
        )
    if cfg.optimizer == "auto":
        return "paged_adamw_8bit" if cfg.method == "qlora" and device == "cuda" else "adamw_torch"
    return cfg.optimizer


@contextlib.contextmanager
def tracking_env(report_to: list[str], log_root: Path, experiment: str, run_name: str) -> Iterator[None]:
    """Point transformers' TensorBoard / MLflow callbacks at local stores under `log_root` for the block."""
    env = {}
    if "tensorboard" in report_to:
        env["TENSORBOARD_LOGGING_DIR"] = str(Path(log_root) / "tensorboard" / experiment / run_name)
    if "mlflow" in report_to:
        # a local file store (mlflow-skinny has no SQL backend); MLflow 3 wants the opt-in for it
        env.update(
            MLFLOW_TRACKING_URI=(Path(log_root) / "mlruns").resolve().as_uri(),
            MLFLOW_ALLOW_FILE_STORE="true",
            MLFLOW_EXPERIMENT_NAME=experiment,
            MLFLOW_RUN_NAME=run_name,
            HF_MLFLOW_LOG_ARTIFACTS="false",
        )
    for mod in report_to:
        if importlib.util.find_spec(mod) is None:
            raise FtxError(f"train.report_to: {mod} is not installed: pip install 'ftx[monitor]'")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_unsloth(cfg: TrainConfig, base_dir: Path, max_seq_len: int):
    """Unsloth's FastLanguageModel + its LoRA: same peft adapter format on disk (CUDA only)."""
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(base_dir), max_seq_length=max_seq_len, load_in_4bit=cfg.method == "qlora", dtype=None
    )
    targets = target_modules(model, cfg.lora.target_modules)
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False,
        random_state=cfg.seed,
    )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, targets


def plot_loss(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def checkpoint_step(path: str | Path) -> int:
    """The step of a Trainer checkpoint directory (checkpoint-<step>)."""
    return int(Path(path).name.rsplit("-", 1)[1])


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest complete checkpoint: trainer_state.json is written last, so a checkpoint killed while being
    written (no trainer_state.json) is skipped."""
    done = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(done, key=checkpoint_step)) if done else None


def build_model(cfg: TrainConfig, base_dir: Path, max_seq_len: int, device: str, backend: str):
    """(peft model, tokenizer, target module names) ready to train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ..core.models import load_base

    if backend == "unsloth":
        return load_unsloth(cfg, base_dir, max_seq_len)
    model, tok = load_base(base_dir, cfg.method, device)
    targets = target_modules(model, cfg.lora.target_modules)
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model = get_peft_model(
        model,
        PeftLoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        ),
    )
    return model, tok, targets


def run(
    cfg: TrainConfig,
    base_dir: Path,
    train_file: Path,
    val_file: Path,
    max_seq_len: int,
    out: Path,
    checkpoint_dir: Path | None = None,
    log_root: Path | None = None,
    run_name: str = "ftx",
) -> TrainResult:
    """Train and save the adapter into `out`. Checkpoints go to `checkpoint_dir` (outside the stage's temp dir,
    so they survive a crash); if it already holds checkpoints of this exact stage, training resumes from the
    latest one (optimizer, scheduler, RNG and data order included)."""
    import torch
    from transformers import (
        EarlyStoppingCallback,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from ..core import chat
    from ..core.models import pick_device
    from ..core.progress import trainer_monitor
    from ..core.usage import peak_memory_mb

    device = pick_device()
    backend = pick_backend(cfg, device)
    optimizer = pick_optimizer(cfg, device)
    world, dist, zero, per_device = launch.workers(cfg.distributed, cfg.batch_size, "train.batch_size")
    set_seed(cfg.seed)
    model, tok, targets = build_model(cfg, base_dir, max_seq_len, device, backend)
    model.config.use_cache = False  # a KV cache in training also turns off packed-sequence masking
    packing = cfg.packing
    if packing == "auto":  # measured on CPU/SDPA: the dense block-diagonal mask makes packing 0.86x of padding
        packing = str(model.config._attn_implementation).startswith("flash")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_ds = [chat.render_example(tok, ex, max_seq_len) for ex in chat.read_examples(train_file)]
    val_ds = [chat.render_example(tok, ex, max_seq_len) for ex in chat.read_examples(val_file)]
    max_steps = cfg.max_steps
    if cfg.epochs:
        max_steps = max(1, math.ceil(cfg.epochs * len(train_ds) / (cfg.batch_size * cfg.grad_accum)))
    checkpoint_dir = Path(checkpoint_dir or out / "checkpoints")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = latest_checkpoint(checkpoint_dir)
    resumed_from = checkpoint_step(last) if last else None
    # metrics live beside the checkpoints while training, so a resumed run keeps its history
    metrics_path = checkpoint_dir / "metrics.jsonl"
    kept = []
    if last and metrics_path.exists():
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= resumed_from]
    diverged: dict = {"step": None}

    def all_tokens() -> int:  # every worker's count (on_log runs on every rank at the same steps)
        if dist is None:
            return counted["tokens"]
        import torch.distributed as D

        t = torch.tensor([counted["tokens"]], device=device if device == "cpu" else f"cuda:{os.environ['LOCAL_RANK']}")
        D.all_reduce(t)
        return int(t.item())

    counted = {"tokens": 0, "training": False}  # the collator serves eval batches too: count training ones only
    t_start = time.perf_counter()

    def row(state, logs: dict) -> dict | None:
        r = {
            "step": state.global_step,
            "time_s": round(time.perf_counter() - t_start, 3),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
        }
        if "loss" in logs:
            r.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"))
            r["tokens_per_s"] = all_tokens() / max(r["time_s"], 1e-9)
        if "eval_loss" in logs:
            r.update(val_loss=logs["eval_loss"], val_perplexity=math.exp(min(logs["eval_loss"], 50)))
        return r if len(r) > 3 else None

    class CountTokens(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            counted["training"] = not args.eval_on_start

        def on_step_end(self, args, state, control, **kw):
            counted["training"] = not control.should_evaluate  # eval batches are collated next

        def on_evaluate(self, args, state, control, **kw):
            counted["training"] = True

    def collator(batch):
        b = collate_packed(batch) if packing else chat.collate(batch, tok.pad_token_id)
        if counted["training"]:
            counted["tokens"] += int((b["labels"] != -100).sum())
        return b

    save_every = cfg.eval_every if cfg.early_stopping_patience else (cfg.save_every or cfg.eval_every)
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=max_steps,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=cfg.eval_every,
        eval_on_start=not last,
        save_strategy="steps",
        save_steps=save_every,
        save_total_limit=2,
        report_to=list(cfg.report_to),
        optim=optimizer,
        gradient_checkpointing=cfg.gradient_checkpointing and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        load_best_model_at_end=bool(cfg.early_stopping_patience),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        log_level="error",
        **(launch.trainer_args(dist, device) if dist else {}),
    )
    experiment, _, name = run_name.rpartition("/")
    with open(metrics_path if zero else os.devnull, "w") as metrics_f:
        metrics_f.writelines(kept)
        callbacks = [
            trainer_monitor("train", metrics_f, row, ("loss", "val_loss", "tokens_per_s"), diverged, quiet=not zero),
            CountTokens(),
        ]
        if cfg.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
        with tracking_env(cfg.report_to, log_root or out, experiment=experiment or "ftx", run_name=name):
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=train_ds,
                eval_dataset=val_ds,
                data_collator=collator,
                callbacks=callbacks,
            )
            trainer.remove_callback(PrinterCallback)
            t0 = time.perf_counter()
            train_out = trainer.train(resume_from_checkpoint=last)
        if diverged["step"] is not None:
            raise FtxError(
                f"training loss became NaN/inf at step {diverged['step']}; lower train.learning_rate "
                f"(now {cfg.learning_rate:g}) or check the data"
            )
        elapsed = time.perf_counter() - t0
        history = trainer.state.log_history
        evals = [h for h in history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        best_step = None
        if cfg.early_stopping_patience:  # the best checkpoint's weights were loaded back: evaluate those
            best_step = checkpoint_step(trainer.state.best_model_checkpoint)
            evals = [h for h in history if "eval_loss" in h and h.get("step") == best_step]
        final_eval = evals[-1] if evals else trainer.evaluate()  # evaluate() logs its row through the monitor
    tokens = all_tokens()
    wrapper = type(trainer.model_wrapped).__name__ if dist else None
    if dist and dist.strategy != "ddp" and wrapper == "DistributedDataParallel":
        raise FtxError(f"train.distributed.strategy: {dist.strategy} was asked for, but the Trainer ran plain DDP")
    if dist and dist.strategy != "ddp":  # sharded weights: every rank takes part in gathering, the main one writes
        trainer.save_model(str(out / "adapter"))
    if not zero:
        return None
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(metrics_path, out / "metrics.jsonl")
    if not dist or dist.strategy == "ddp":
        model.save_pretrained(out / "adapter")
    tok.save_pretrained(out / "adapter")
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    losses = [h["loss"] for h in history if "loss" in h]
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    return TrainResult(
        adapter_dir="adapter",
        steps=train_out.global_step,
        train_loss=float(train_out.training_loss),
        final_loss=losses[-1] if losses else None,
        val_loss=float(final_eval["eval_loss"]),
        val_perplexity=math.exp(min(final_eval["eval_loss"], 50)),
        trained_tokens=tokens,
        tokens_per_s=tokens / max(elapsed, 1e-9),
        device=device,
        best_step=best_step,
        stopped_early=train_out.global_step < max_steps,
        resumed_from_step=resumed_from,
        backend=backend,
        target_modules=targets,
        trainable_params=trainable,
        optimizer=optimizer,
        packing=packing,
        peak_memory_mb=peak_memory_mb(device),
        world_size=world,
        strategy=dist.strategy if dist else None,
        wrapper=wrapper,
    )


class Train(Stage):
    name = "train"
    config = TrainConfig
    result = TrainResult
    needs = ("data",)
    provides = "adapter"
    reads = ("data.max_seq_len",)

    def extra_inputs(self, ctx) -> dict[str, Path]:
        return {"base_model": ctx.base_dir}

    def prepare(self, ctx):
        from ..core.models import pick_device

        device = pick_device()  # GPU-only choices on a CPU machine fail now, not after the base model loads
        pick_backend(ctx.cfg, device)
        pick_optimizer(ctx.cfg, device)
        if ctx.cfg.distributed:
            launch.check(ctx.cfg.distributed, ctx.cfg.method, device, ctx.cfg.batch_size)

    def job(self, ctx, out: Path) -> dict:
        """Everything `run` needs, as JSON (a distributed run's workers read it from the spec file)."""
        d = ctx.upstream("data").result
        return {
            "config": ctx.cfg.model_dump(mode="json"),
            "base_dir": str(ctx.base_dir),
            "train_file": str(ctx.file("data", d["train_file"])),
            "val_file": str(ctx.file("data", d["val_file"])),
            "max_seq_len": ctx.setting("data.max_seq_len"),
            "out": str(out),
            # checkpoints are keyed like the stage and live outside its temp dir: a crashed run resumes from them
            "checkpoint_dir": str(ctx.out_root / ".cache" / self.name / f"{ctx.key}.checkpoints"),
            "log_root": str(ctx.out_root),
            "run_name": f"{ctx.recipe_name}/{ctx.key}",
        }

    def launch_plan(self, ctx) -> tuple[Path, dict, list[list[str]]]:
        """Write the job spec of a distributed run and return (its directory, the job, every node's launch command).
        The directory is keyed like the stage, so `ftx train --print-launch` and the run agree on it."""
        from ..core.models import pick_device

        here = ctx.out_root / ".cache" / self.name / f"{ctx.key}.launch"
        job = self.job(ctx, here / "result")
        return here, job, launch.plan(ctx.cfg.distributed, "ftx.stages.train", job, here, pick_device())

    def run(self, ctx, out: Path) -> TrainResult:
        dist = ctx.cfg.distributed
        if dist and dist.world_size > 1:
            here, job, cmds = self.launch_plan(ctx)
            result = TrainResult.model_validate_json(launch.run_here(dist, cmds, here, out, ctx.console))
        else:
            job = self.job(ctx, out)
            result = work(job)
        shutil.rmtree(job["checkpoint_dir"], ignore_errors=True)
        return result

    def headline(self, r: dict) -> str:
        return f"val loss {r['val_loss']:.3f}, {r['steps']} steps"

    def artifacts(self, r: dict) -> list[Artifact]:
        return [Artifact(r["adapter_dir"], "adapter"), Artifact("loss.png", "loss.png", copy=True)]


def work(job: dict) -> TrainResult | None:
    """Train from a job dict (Train.job); None in a distributed worker other than rank 0."""
    return run(
        TrainConfig.model_validate(job["config"]),
        Path(job["base_dir"]),
        Path(job["train_file"]),
        Path(job["val_file"]),
        job["max_seq_len"],
        Path(job["out"]),
        Path(job["checkpoint_dir"]),
        log_root=Path(job["log_root"]),
        run_name=job["run_name"],
    )


if __name__ == "__main__":  # a worker of a distributed run: python -m ftx.stages.train SPEC.json
    launch.worker(work)
