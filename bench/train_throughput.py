"""Trained (response) tokens per second: ftx's batching vs the naive baseline the fine-tuning guides show.

A  (ftx, packing: false, the default on CPU): rows rendered with the chat template, labels on assistant
           tokens only, batches padded to their longest row (ftx.core.chat.collate).
A' (ftx, packing: true, the default with flash-attention): the same rows, each batch packed into one row
           without padding and without cross-example attention (ftx.stages.train.collate_packed).
B (naive): the same rendered text tokenized with padding="max_length" (max_seq_len), labels = input_ids
           (DataCollatorForLanguageModeling), as in the common HF Trainer recipes.
Same base model (SmolLM2-135M, fp32 on CPU), same rows, same LoRA config, batch size and step count;
only trainer.train() is timed. Rounds alternate the arms' order (bench/harness.py) so machine drift hits all.
Both count the same useful tokens: the response tokens of the rows they trained on.

Headline `ratio` = median over rounds of A / B response tokens per second (target >= 3); A'/A is reported too.

    .venv/bin/python bench/train_throughput.py [--steps 6] [--rounds 5] [--max-seq-len 512]
"""

import tempfile
import time
from pathlib import Path

import harness


def run_once(kind: str, base_dir: Path, rows: list, steps: int, batch: int, max_seq_len: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from ftx.core import chat
    from ftx.core.chat import collate
    from ftx.stages.train import collate_packed

    set_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    rendered = [chat.render(tok, m, max_seq_len) for m in rows]
    response_tokens = [sum(x != -100 for x in r["labels"]) for r in rendered]
    if kind == "ftx-packed":
        ds, collator = rendered, collate_packed
    elif kind == "ftx":
        ds, collator = rendered, (lambda b: collate(b, tok.pad_token_id))
    else:
        texts = [tok.apply_chat_template(m, tokenize=False) for m in rows]
        enc = tok(texts, padding="max_length", max_length=max_seq_len, truncation=True, add_special_tokens=False)
        ds = [{"input_ids": i, "attention_mask": a} for i, a in zip(enc["input_ids"], enc["attention_mask"])]
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    assert len(rows) == steps * batch  # one epoch: both runs train on every row exactly once
    useful = sum(response_tokens)
    return {
        "kind": kind,
        "wall_s": wall,
        "response_tokens": useful,
        "tokens_per_s": useful / wall,
        "s_per_step": wall / steps,
    }


def main() -> None:
    from ftx.core import basemodel
    from ftx.core.rows import load_rows

    ap = harness.parser(__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=512)
    args = ap.parse_args()
    base_dir = basemodel.resolve("smollm2-135m-instruct")
    rows = load_rows(harness.ROOT / "recipes" / "data" / "quickstart.jsonl")[: args.steps * args.batch]
    arms = {
        kind: (lambda k=kind: run_once(k, base_dir, rows, args.steps, args.batch, args.max_seq_len))
        for kind in ("naive", "ftx", "ftx-packed")
    }
    runs = harness.ab_rounds(arms, args.rounds, args.warmup)
    med = harness.medians(runs, ("tokens_per_s", "s_per_step"))
    headline = harness.summarize(harness.per_round(runs, "tokens_per_s", "ftx", "naive"), ">= 3")
    packing = harness.summarize(harness.per_round(runs, "tokens_per_s", "ftx-packed", "ftx"), None)
    harness.table(
        f"LoRA training throughput, {args.steps} steps x batch {args.batch}, max_seq_len {args.max_seq_len}",
        ["batching", "response tokens/s (median)", "s/step (median)"],
        [
            [
                "ftx CPU default: pad to longest in batch, response-only loss",
                f"{med['ftx']['tokens_per_s']:.1f}",
                f"{med['ftx']['s_per_step']:.2f}",
            ],
            [
                "ftx packing: true (no padding, block-diagonal mask)",
                f"{med['ftx-packed']['tokens_per_s']:.1f}",
                f"{med['ftx-packed']['s_per_step']:.2f}",
            ],
            [
                'naive: padding="max_length", labels=input_ids',
                f"{med['naive']['tokens_per_s']:.1f}",
                f"{med['naive']['s_per_step']:.2f}",
            ],
            ["packed / padded-to-longest (SDPA, CPU)", f"{packing['ratio']:.2f}x", ""],
        ],
    )
    harness.write(
        "train_throughput",
        headline,
        {**vars(args), "model": "smollm2-135m-instruct", "rows": len(rows), "device": "cpu", "dtype": "fp32"},
        packing_vs_padded=packing,
        median=med,
        runs=runs,
    )


if __name__ == "__main__":
    main()
