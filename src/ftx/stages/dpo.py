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
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core import launch
from ..core.errors import FtxError
from ..core.launch import DistributedConfig
from ..core.models import SCHEDULERS
from ..core.splits import DataSource
from ..stage import Artifact, Stage


class DpoData(DataSource):
    format: Literal["auto", "preference"] = Field("preference", description="preference rows (prompt/chosen/rejected)")
    test_fraction: float = Field(0.0, ge=0, lt=1)


class DpoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DpoData
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference (SFT) model")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    learning_rate: float = Field(5e-5, gt=0)
    scheduler: Literal[SCHEDULERS] = "cosine"
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
    return {
        "prompt": ex["prompt"],
        "chosen": [{"role": "assistant", "content": ex["chosen"]}],
        "rejected": [{"role": "assistant", "content": ex["rejected"]}],
    }


def reply_logps(model, tok, items: list[tuple[list[dict], str]], max_seq_len: int, batch_size: int = 16) -> list[float]:
    """Sum of log-probabilities of each reply's tokens after its prompt (chat template applied), in padded batches
    (right padding: the causal mask keeps the padding out of every real position)."""
    import torch

    from ..core import chat

    rows = [chat.render(tok, p + [{"role": "assistant", "content": r}], max_seq_len) for p, r in items]
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(model.device) for k, v in chat.collate(rows[i : i + batch_size], tok.pad_token_id).items()}
            logp = torch.log_softmax(
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), -1
            )
            labels = b["labels"][:, 1:]
            picked = logp[:, :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            out += (picked * (labels != -100)).sum(-1).tolist()
    return out


def preference_margins(model, tok, pairs: list[dict], max_seq_len: int) -> tuple[float, float]:
    """(share of pairs with logp(chosen) > logp(rejected), mean margin)."""
    logps = reply_logps(
        model, tok, [(p["prompt"], r) for p in pairs for r in (p["chosen"], p["rejected"])], max_seq_len
    )
    margins = [c - r for c, r in zip(logps[::2], logps[1::2])]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def plot(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for key, label, ax in (
        ("loss", "train loss", a1),
        ("eval_loss", "val loss", a1),
        ("rewards/margins", "train reward margin", a2),
        ("eval_rewards/margins", "val reward margin", a2),
    ):
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


def run(
    cfg: DpoConfig,
    base_dir: Path,
    sft_adapter: Path,
    splits: dict[str, list[dict]],
    max_seq_len: int,
    out: Path,
    method: str = "lora",
    distributed: DistributedConfig | None = None,
) -> DpoResult | None:
    """Continue the SFT adapter with DPO on `splits` (from ftx.core.splits.prepare of cfg.data); save into `out`.
    In a distributed worker (train.distributed: the same launcher as the train stage) only rank 0 writes and returns
    the result; `batch_size` is over all workers."""
    import os
    import shutil

    from datasets import Dataset
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import PrinterCallback, set_seed
    from trl import DPOConfig, DPOTrainer

    from ..core.chat import write_jsonl
    from ..core.models import load_base, pick_device
    from ..core.progress import trainer_monitor

    device = pick_device()
    _, dist, zero, per_device = launch.workers(distributed, cfg.batch_size, "dpo.batch_size")
    set_seed(cfg.seed)
    model, tok = load_base(base_dir, method, device)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, sft_adapter, is_trainable=True)
    model.config.use_cache = False
    train_rows, val_rows = splits["train"], splits["val"]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val") if zero else ():
        write_jsonl(out / f"{name}.jsonl", splits[name])
    model.eval()
    sft_acc, sft_margin = preference_margins(model, tok, val_rows, max_seq_len) if zero else (None, None)
    stopped: dict = {"step": None}
    t0 = time.perf_counter()

    def row(state, logs: dict) -> dict:
        return {"step": state.global_step, "time_s": round(time.perf_counter() - t0, 3), **logs}

    args = DPOConfig(
        output_dir=str(out / ".trainer"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        max_length=max_seq_len,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=cfg.eval_every,
        eval_on_start=False,  # at step 0 the policy is the reference: trl's rewards are 0 and the loss log 2
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=0,
        disable_tqdm=True,
        log_level="error",
        **(launch.trainer_args(dist, device) if dist else {}),
    )
    with open(out / "metrics.jsonl" if zero else os.devnull, "w") as metrics_f:
        monitor = trainer_monitor(
            "dpo", metrics_f, row, ("loss", "rewards/margins", "eval_rewards/accuracies"), stopped, quiet=not zero
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            processing_class=tok,
            callbacks=[monitor],
            train_dataset=Dataset.from_list([to_trl(r) for r in train_rows]),
            eval_dataset=Dataset.from_list([to_trl(r) for r in val_rows]),
        )
        trainer.remove_callback(PrinterCallback)
        train_out = trainer.train()
        if stopped["step"] is not None:
            raise FtxError(
                f"DPO loss became NaN/inf at step {stopped['step']}; lower dpo.learning_rate "
                f"(now {cfg.learning_rate:g}) or raise dpo.beta"
            )
        final = (
            next(
                (
                    h
                    for h in reversed(trainer.state.log_history)
                    if "eval_loss" in h and h.get("step") == trainer.state.global_step
                ),
                None,
            )
            or trainer.evaluate()
        )
    if not zero:
        return None
    model = trainer.model
    model.eval()
    dpo_acc, dpo_margin = preference_margins(model, tok, val_rows, max_seq_len)
    model.save_pretrained(out / "adapter", selected_adapters=["default"])
    tok.save_pretrained(out / "adapter")
    plot(out / "metrics.jsonl", out / "dpo.png")
    shutil.rmtree(out / ".trainer", ignore_errors=True)
    return DpoResult(
        adapter_dir="adapter",
        steps=train_out.global_step,
        train_loss=float(train_out.training_loss),
        val_loss=float(final["eval_loss"]),
        reward_accuracy=float(final["eval_rewards/accuracies"]),
        reward_margin=float(final["eval_rewards/margins"]),
        pairs_train=len(train_rows),
        pairs_val=len(val_rows),
        sft_preference_accuracy=sft_acc,
        dpo_preference_accuracy=dpo_acc,
        sft_logp_margin=sft_margin,
        dpo_logp_margin=dpo_margin,
        device=device,
    )


class Dpo(Stage):
    name = "dpo"
    config = DpoConfig
    result = DpoResult
    optional = True
    needs = ("train",)
    provides = "adapter"
    reads = ("data.max_seq_len", "train.method", "train.distributed")

    def prepare(self, ctx):
        from ..core.splits import prepare

        pairs, _ = prepare(ctx.cfg.data)  # the preference pairs are checked before hours of SFT, not after
        dist = ctx.setting("train.distributed")
        if dist:
            launch.per_device_batch(ctx.cfg.batch_size, dist.world_size, "dpo.batch_size")
        return pairs

    def run(self, ctx, out: Path) -> DpoResult:
        sft = ctx.upstream("train")
        dist = ctx.setting("train.distributed")
        job = {
            "config": ctx.cfg.model_dump(mode="json"),
            "base_dir": str(ctx.base_dir),
            "sft_adapter": str(ctx.file("train", sft.result["adapter_dir"])),
            "max_seq_len": ctx.setting("data.max_seq_len"),
            "method": ctx.setting("train.method"),
            "distributed": dist.model_dump(mode="json") if dist else None,
        }
        if not dist or dist.world_size == 1:
            return run_job({**job, "out": str(out)}, ctx.prepared)
        from ..core.chat import write_jsonl
        from ..core.models import pick_device

        here = ctx.out_root / ".cache" / self.name / f"{ctx.key}.launch"
        here.mkdir(parents=True, exist_ok=True)
        for name in ("train", "val"):  # the workers read the prepared split from here
            write_jsonl(here / f"split-{name}.jsonl", ctx.prepared[name])
        job |= {"out": str(here / "result"), "split_dir": str(here)}
        cmds = launch.plan(dist, "ftx.stages.dpo", job, here, pick_device())
        return DpoResult.model_validate_json(launch.run_here(dist, cmds, here, out, ctx.console))

    def headline(self, r: dict) -> str:
        return (
            f"preference acc {100 * r['sft_preference_accuracy']:.0f}% -> {100 * r['dpo_preference_accuracy']:.0f}%, "
            f"margin {r['sft_logp_margin']:.2f} -> {r['dpo_logp_margin']:.2f}"
        )

    def artifacts(self, r: dict) -> list[Artifact]:
        return [Artifact(r["adapter_dir"], "adapter"), Artifact("dpo.png", "dpo.png", copy=True)]


def run_job(job: dict, splits: dict | None = None) -> DpoResult | None:
    """DPO from a job dict (Dpo.run); a distributed worker reads the split the stage wrote."""
    from ..core.chat import read_examples

    if splits is None:
        splits = {n: read_examples(Path(job["split_dir"]) / f"split-{n}.jsonl") for n in ("train", "val")}
    dist = job.get("distributed")
    return run(
        DpoConfig.model_validate(job["config"]),
        Path(job["base_dir"]),
        Path(job["sft_adapter"]),
        splits,
        job["max_seq_len"],
        Path(job["out"]),
        job["method"],
        DistributedConfig.model_validate(dist) if dist else None,
    )


if __name__ == "__main__":  # a worker of a distributed run: python -m ftx.stages.dpo SPEC.json
    launch.worker(run_job)
