"""Eval generation throughput: answers per second of ftx's held-out generation against a plain sequential loop.

A (ftx): ftx.core.models.generate(model, tok, prompts, max_new_tokens, batch_size=32), what the eval stage runs:
         greedy, the prompts rendered with the chat template and left-padded into batches, one model.generate
         per batch.
B (sequential): the loop the Hugging Face docs show: for each prompt, tok.apply_chat_template(...,
         add_generation_prompt=True) and one greedy model.generate(max_new_tokens=...), decoded without special
         tokens.
Same base model (SmolLM2-135M-Instruct, converted from the packaged GGUF, fp32 on CPU, one model object shared by
both arms), same prompts (the quickstart's held-out prompts, then its validation split's, as the data stage splits
recipes/quickstart.yaml's data), same max_new_tokens (the eval stage's default, 48). Rounds alternate the arms'
order (bench/harness.py). Also reported: generated tokens per second of each arm (the tokens of each answer, its
end token included) and the share of prompts whose greedy answers are identical in both arms (left padding
changes the fp32 arithmetic of a batch, which can flip a near-tie and change a few answers).

Headline `ratio` = median over rounds of A / B answers per second (target >= 3).

    .venv/bin/python bench/eval_throughput.py [--rounds 3] [--prompts 32] [--max-new-tokens 48] [--batch-size 32]
"""

import os
import time

import harness

RECIPE = harness.ROOT / "recipes" / "quickstart.yaml"


def quickstart_prompts(n: int) -> tuple[list[list[dict]], str]:
    """`n` chat prompts: the held-out split, then the validation split, of the latest quickstart run's data stage;
    without a run, the same splits made here from the recipe's data section (the data stage's own code)."""
    from ftx.core import chat

    data = harness.ROOT / "runs" / "quickstart" / "latest" / "stages" / "data"
    if (data / "val.jsonl").is_file():
        held = chat.read_split(data / "heldout.jsonl") if (data / "heldout.jsonl").is_file() else []
        convs, source = held + chat.read_split(data / "val.jsonl"), str(data)
    else:
        import yaml

        from ftx.core.splits import prepare
        from ftx.stages.data import DataConfig

        raw = yaml.safe_load(RECIPE.read_text())["data"]
        for key in ("path", "heldout"):
            if raw.get(key):
                raw[key] = str((RECIPE.parent / raw[key]).resolve())
        splits, _ = prepare(DataConfig.model_validate(raw))
        convs = [ex["messages"] for ex in splits["heldout"] + splits["val"] if "messages" in ex]
        source = f"{RECIPE.relative_to(harness.ROOT)} data (held-out, then val split; no quickstart run here)"
    prompts, _ = chat.split_answers(convs)
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} prompts in {source}; pass --prompts {len(prompts)} or fewer")
    return prompts[:n], source


def with_ftx(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list:
    from ftx.core.models import generate

    answers = generate(model, tok, prompts, max_new_tokens, batch_size=batch_size)
    return [(str(a), a.tokens, a.truncated) for a in answers]


def sequential(model, tok, prompts: list[list[dict]], max_new_tokens: int) -> list:
    import torch

    out = []
    for messages in prompts:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            y = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        row = y[0, enc["input_ids"].shape[1] :].tolist()
        truncated = row[-1] != tok.eos_token_id
        out.append((tok.decode(row, skip_special_tokens=True).strip(), len(row), truncated))
    return out


def arm(fn, answers: list, *args):
    """An arm of the harness: time one pass over the prompts; keep its answers (round by round)."""

    def run() -> dict:
        t0 = time.perf_counter()
        got = fn(*args)
        wall = time.perf_counter() - t0
        answers.append(got)
        tokens = sum(t for _, t, _ in got)
        return {
            "wall_s": wall,
            "answers": len(got),
            "tokens": tokens,
            "truncated": sum(bool(x) for _, _, x in got),
            "answers_per_s": len(got) / wall,
            "tokens_per_s": tokens / wall,
            "loadavg_1m": os.getloadavg()[0],  # ~2 is this arm alone on 2 cores; more: other work shared the CPU
        }

    return run


def main() -> None:
    import torch

    from ftx.core import basemodel
    from ftx.core.chat import prompt_ids
    from ftx.core.models import load_base

    ap = harness.parser(__doc__, rounds=3)
    ap.add_argument("--prompts", type=int, default=32, help="chat prompts answered per arm and round (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer at most (default 48)")
    ap.add_argument("--batch-size", type=int, default=32, help="ftx's generation batch size (default 32)")
    args = ap.parse_args()
    t_start, load_before = time.perf_counter(), os.getloadavg()
    base_dir = basemodel.resolve("smollm2-135m-instruct")
    model, tok = load_base(base_dir, "lora", "cpu")  # fp32, eval mode: what the eval stage loads on CPU
    prompts, source = quickstart_prompts(args.prompts)
    lengths = [len(prompt_ids(tok, p)) for p in prompts]
    answers: dict[str, list] = {"sequential": [], "ftx": []}
    arms = {
        "sequential": arm(sequential, answers["sequential"], model, tok, prompts, args.max_new_tokens),
        "ftx": arm(with_ftx, answers["ftx"], model, tok, prompts, args.max_new_tokens, args.batch_size),
    }
    runs = harness.ab_rounds(arms, args.rounds, args.warmup)
    metrics = ("answers_per_s", "tokens_per_s", "wall_s", "tokens", "truncated")
    med = harness.medians(runs, metrics)
    ratios = harness.per_round(runs, "answers_per_s", "ftx", "sequential")
    headline = harness.summarize(ratios, ">= 3")
    token_ratio = harness.summarize(harness.per_round(runs, "tokens_per_s", "ftx", "sequential"), None)

    # greedy answers: every pass of an arm should give the same ones; then arm against arm
    stable = {k: all(v == a[0] for v in a) for k, a in answers.items()}
    seq, ftx = answers["sequential"][-1], answers["ftx"][-1]
    same = [s[0] == f[0] for s, f in zip(seq, ftx)]
    differing = [
        {
            "prompt": p[-1]["content"],
            "sequential": s[0],
            "ftx": f[0],
            "tokens": {"sequential": s[1], "ftx": f[1]},
            "common_prefix_chars": len(_common_prefix(s[0], f[0])),
        }
        for p, s, f, eq in zip(prompts, seq, ftx, same)
        if not eq
    ]
    identical = sum(same) / len(same)

    label = {"sequential": "sequential HF loop", "ftx": f"ftx (batch {args.batch_size})"}
    harness.table(
        f"greedy generation, {len(prompts)} prompts x max_new_tokens {args.max_new_tokens}, SmolLM2-135M fp32 CPU "
        f"({torch.get_num_threads()} threads), medians",
        ["arm", "answers/s", "gen tok/s", "wall s", "tokens", "hit limit", "wall s by round"],
        [
            [
                label[k],
                f"{med[k]['answers_per_s']:.2f}",
                f"{med[k]['tokens_per_s']:.1f}",
                f"{med[k]['wall_s']:.1f}",
                f"{med[k]['tokens']:.0f}",
                f"{med[k]['truncated']:.0f}/{len(prompts)}",
                ", ".join(f"{r['wall_s']:.1f}" for r in v),
            ]
            for k, v in runs.items()
        ]
        + [
            [
                "ftx / seq. by round",
                ", ".join(f"{r:.2f}x" for r in ratios),
                ", ".join(f"{r:.2f}x" for r in token_ratio["rounds"]),
                "",
                "",
                "",
                "",
            ],
            [
                "identical answers",
                f"{sum(same)}/{len(same)} ({100 * identical:.0f}%)",
                "",
                "",
                "",
                "",
                f"repeatable: {'yes' if all(stable.values()) else stable}",
            ],
        ],
    )
    for d in differing[:5]:
        print(f"differs: {d['prompt']!r}\n  sequential: {d['sequential']!r}\n  ftx:        {d['ftx']!r}")
    wall = time.perf_counter() - t_start
    print(f"benchmark wall time: {wall:.0f} s")
    harness.write(
        "eval_throughput",
        headline,
        {
            **vars(args),
            "model": "smollm2-135m-instruct",
            "model_dir": str(base_dir),
            "device": "cpu",
            "dtype": "fp32",
            "torch_threads": torch.get_num_threads(),
            "prompts_from": source,
            "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
        },
        tokens_per_s_ratio=token_ratio,
        identical_answers={"share": identical, "count": sum(same), "of": len(same), "differing": differing},
        repeatable=stable,
        median=med,
        runs=runs,
        wall_s=wall,
        loadavg_1_5_15={"start": load_before, "end": os.getloadavg()},  # a shared machine: other work running?
    )


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


if __name__ == "__main__":
    main()
