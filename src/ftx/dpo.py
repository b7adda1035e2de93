"""DPO stage: preference tuning after SFT, with trl's DPOTrainer.

The SFT adapter keeps training (it is loaded trainable); trl copies it into a frozen "ref" adapter, so the
reference policy is the SFT model and nothing but one extra adapter is held in memory. The result is the
same standard peft adapter format as the train stage, so eval/merge/export do not care which stage made it.

Besides trl's own reward metrics (which start at exactly 0: policy == reference), the stage measures what
a user cares about on the held-out pairs, before and after: how often the model gives the chosen reply a
higher log-probability than the rejected one, and the mean log-probability margin.
Writes: adapter/, train.jsonl/val.jsonl (the preference split), metrics.jsonl, dpo.png.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .data import DataConfig
from .errors import FtxError


class DpoData(DataConfig):
    format: Literal["auto", "preference"] = "preference"
    test_fraction: float = Field(0.0, ge=0, lt=1)


class DpoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DpoData
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (SFT) model")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    learning_rate: float = Field(5e-5, gt=0)
    scheduler: str = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(50, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    eval_every: int = Field(10, ge=1)
    seed: int = 0


class DpoResult(BaseModel):
    adapter_dir: str
    steps: int
    train_loss: float
    val_loss: float
    reward_accuracy: float = Field(description="trl eval rewards/accuracies at the end")
    reward_margin: float = Field(description="trl eval rewards/margins at the end")
    pairs_train: int
    pairs_val: int
    sft_preference_accuracy: float = Field(description="val pairs where logp(chosen) > logp(rejected), SFT model")
    dpo_preference_accuracy: float
    sft_logp_margin: float = Field(description="mean logp(chosen) - logp(rejected) on val pairs, SFT model")
    dpo_logp_margin: float
    device: str


def to_trl(ex: dict) -> dict:
    """ftx preference row -> trl's conversational preference format."""
    return {"prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": ex["chosen"]}],
            "rejected": [{"role": "assistant", "content": ex["rejected"]}]}


def reply_logp(model, tok, prompt: list[dict], reply: str, max_seq_len: int) -> float:
    """Sum of log-probabilities of the reply tokens after the prompt (chat template applied)."""
    import torch

    from . import data

    r = data.render(tok, prompt + [{"role": "assistant", "content": reply}], max_seq_len)
    ids = torch.tensor([r["input_ids"]], device=model.device)
    labels = torch.tensor(r["labels"][1:], device=model.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    keep = labels != -100
    return float(logp[keep].gather(-1, labels[keep][:, None]).sum())


def preference_margins(model, tok, pairs: list[dict], max_seq_len: int) -> tuple[float, float]:
    """(share of pairs with logp(chosen) > logp(rejected), mean margin)."""
    margins = [reply_logp(model, tok, p["prompt"], p["chosen"], max_seq_len)
               - reply_logp(model, tok, p["prompt"], p["rejected"], max_seq_len) for p in pairs]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def plot(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for key, label, ax in (("loss", "train loss", a1), ("eval_loss", "val loss", a1),
                           ("rewards/margins", "train reward margin", a2), ("eval_rewards/margins", "val reward margin", a2)):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-" if key.startswith("eval") else "-", label=label, lw=1)
    for ax, y in ((a1, "DPO loss"), (a2, "reward margin")):
        ax.set_xlabel("step")
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def run(cfg: DpoConfig, base_dir: Path, sft_adapter: Path, splits: dict[str, list[dict]], max_seq_len: int,
        out: Path, method: str = "lora") -> DpoResult:
    """Continue the SFT adapter with DPO on `splits` (from data.prepare of cfg.data); save into `out`."""
    import shutil

    from datasets import Dataset
    from peft import PeftModel, prepare_model_for_kbit_training
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import PrinterCallback, TrainerCallback, set_seed
    from trl import DPOConfig, DPOTrainer

    from .data import write_jsonl
    from .train import load_base
    from .util import pick_device

    device = pick_device()
    set_seed(cfg.seed)
    model, tok = load_base(base_dir, method, device)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, sft_adapter, is_trainable=True)
    model.config.use_cache = False
    train_rows, val_rows = splits["train"], splits["val"]
    for name in ("train", "val"):
        write_jsonl(out / f"{name}.jsonl", splits[name])
    model.eval()
    sft_acc, sft_margin = preference_margins(model, tok, val_rows, max_seq_len)
    metrics_f = open(out / "metrics.jsonl", "w")
    diverged = {"step": None}

    class Monitor(TrainerCallback):
        def __init__(self):
            self.progress = Progress(TextColumn("dpo"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self.progress.start()
            self.task = self.progress.add_task("dpo", total=state.max_steps, info="")

        def on_step_end(self, args, state, control, **kw):
            self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if "loss" in logs and not math.isfinite(logs["loss"]):
                diverged["step"] = state.global_step
                control.should_training_stop = True
            metrics_f.write(json.dumps({"step": state.global_step, "time_s": round(time.perf_counter() - self.t0, 3),
                                        **logs}) + "\n")
            metrics_f.flush()
            info = " ".join(f"{k}={logs[k]:.3g}" for k in ("loss", "rewards/margins", "eval_rewards/accuracies") if k in logs)
            self.progress.update(self.task, info=info)

        def on_train_end(self, args, state, control, **kw):
            self.progress.stop()

    args = DPOConfig(
        output_dir=str(out / ".trainer"), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_steps,
        beta=cfg.beta, loss_type=[cfg.loss_type], max_length=max_seq_len, logging_steps=1, eval_strategy="steps",
        eval_steps=cfg.eval_every, eval_on_start=True, save_strategy="no", report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=device == "cpu", bf16=device == "cuda", dataloader_num_workers=0, disable_tqdm=True, log_level="error",
    )
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, callbacks=[Monitor()],
                         train_dataset=Dataset.from_list([to_trl(r) for r in train_rows]),
                         eval_dataset=Dataset.from_list([to_trl(r) for r in val_rows]))
    trainer.remove_callback(PrinterCallback)
    train_out = trainer.train()
    if diverged["step"] is not None:
        metrics_f.close()
        raise FtxError(f"DPO loss became NaN/inf at step {diverged['step']}; lower dpo.learning_rate "
                       f"(now {cfg.learning_rate:g}) or raise dpo.beta")
    final = next((h for h in reversed(trainer.state.log_history)
                  if "eval_loss" in h and h.get("step") == trainer.state.global_step), None) or trainer.evaluate()
    metrics_f.close()
    model = trainer.model
    model.eval()
    dpo_acc, dpo_margin = preference_margins(model, tok, val_rows, max_seq_len)
    model.save_pretrained(out / "adapter", selected_adapters=["default"])
    tok.save_pretrained(out / "adapter")
    plot(out / "metrics.jsonl", out / "dpo.png")
    shutil.rmtree(out / ".trainer", ignore_errors=True)
    return DpoResult(
        adapter_dir="adapter", steps=train_out.global_step, train_loss=float(train_out.training_loss),
        val_loss=float(final["eval_loss"]), reward_accuracy=float(final["eval_rewards/accuracies"]),
        reward_margin=float(final["eval_rewards/margins"]), pairs_train=len(train_rows), pairs_val=len(val_rows),
        sft_preference_accuracy=sft_acc, dpo_preference_accuracy=dpo_acc, sft_logp_margin=sft_margin,
        dpo_logp_margin=dpo_margin, device=device,
    )
