"""Chat examples on disk and as tokens: the split files (JSONL) and rendering with the tokenizer's own chat
template into input ids and labels that train on the assistant turns only. Shared by every stage that reads
the data stage's splits (train, DPO, eval, merge and export checks, serve checks)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FtxError


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def read_examples(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_split(path: Path) -> list[list[dict]]:
    """Chat conversations of a split file written by the data stage (rows without messages are skipped)."""
    return [ex["messages"] for ex in read_examples(path) if "messages" in ex]


def _ids(x) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def end_ids(tokenizer, model_dir: Path | None = None) -> list[int]:
    """The model's declared end tokens: generation_config's eos_token_id (one or several), then the tokenizer's."""
    ids: list[int] = []
    gen = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


class Answer(str):
    """A generated answer: its text, plus how it was generated where the generator knows: the tokens it took and
    whether it ran to the token limit instead of ending (metrics of length and truncation read these)."""

    tokens: int | None = None
    truncated: bool | None = None

    @classmethod
    def of(cls, text: str, tokens: int | None = None, truncated: bool | None = None) -> Answer:
        a = cls(text)
        a.tokens, a.truncated = tokens, truncated
        return a


def split_answers(conversations: list[list[dict]]) -> tuple[list[list[dict]], list[str]]:
    """Prompts and reference answers of held-out conversations: the messages before a final assistant turn, and
    that turn's text ("" when a conversation does not end with one)."""
    prompts, refs = [], []
    for m in conversations:
        last = m[-1]["role"] == "assistant"
        prompts.append(m[:-1] if last else m)
        refs.append(m[-1]["content"] if last else "")
    return prompts, refs


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def render(tokenizer, messages: list[dict], max_seq_len: int) -> dict:
    """Token ids of a conversation and labels that train on every assistant turn and nothing else.

    For each assistant turn i, the conversation before it is rendered with `add_generation_prompt=True`
    and the conversation up to and including it without; the tokens between the two are that turn's reply
    (with its end-of-turn token). The chat template must render each shorter conversation as a prefix of the
    longer one, otherwise the mask would be wrong; that is checked. An assistant turn with `weight: 0` (OpenAI's
    fine-tuning format) is context, not a target.
    """
    weights = [m.get("weight", 1) for m in messages]
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    labels = [-100] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or weights[i] == 0:
            continue
        before = prompt_ids(tokenizer, messages[:i])
        upto = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        if full[: len(before)] != before or full[: len(upto)] != upto:
            raise FtxError("chat template does not render each turn as a prefix of the conversation")
        labels[len(before) : len(upto)] = full[len(before) : len(upto)]
    return {"input_ids": full[:max_seq_len], "labels": labels[:max_seq_len]}


def render_example(tokenizer, ex: dict, max_seq_len: int) -> dict:
    """A normalized example -> input_ids/labels. Chat: assistant turns only; text: every token."""
    if "messages" in ex:
        return render(tokenizer, ex["messages"], max_seq_len)
    if "text" in ex:
        ids = _ids(tokenizer(ex["text"], add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        ids = ids[:max_seq_len]
        return {"input_ids": ids, "labels": list(ids)}
    raise FtxError(
        "preference rows (prompt/chosen/rejected) are for the dpo stage (recipe `dpo:` section), not "
        "for supervised training: give the train stage chat, alpaca, completion or text rows"
    )


def collate(batch: list[dict], pad_id: int) -> dict:
    """Pad rendered rows to the longest row of this batch (right padding); labels padded with -100."""
    import torch

    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
