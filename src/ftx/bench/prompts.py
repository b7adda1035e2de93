"""Prompts for a bench: the recipe's held-out set, a JSONL file, or synthetic prompts of a controlled length;
and the tokenizer used for synthetic prompts and as the token-count fallback when a server sends no usage."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.config import InputFile
from ..core.errors import FtxError

WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
]


class PromptsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["heldout", "file", "synthetic"] = Field(
        "heldout", description="heldout: the recipe's held-out prompts; file: `path`; synthetic: generated"
    )
    path: InputFile | None = Field(None, description="file: a dataset file in any format the data stage reads")
    encoding: str = Field("utf-8", description="file: its text encoding")
    input_tokens: int = Field(
        128,
        ge=1,
        description="synthetic: prompt length (exact with a tokenizer); the output "
        "length is bench.max_tokens with ignore_eos",
    )
    count: int = Field(64, ge=1, description="synthetic: how many distinct prompts")
    tokenizer: str | None = Field(
        None,
        description="HF dir or packaged model name: synthetic lengths and the "
        "token-count fallback (default: the recipe's base model)",
    )
    seed: int | None = Field(
        None,
        description="synthetic: the prompts' seed. Unset: a fresh seed per run, recorded in the results, and other "
        "prompts for every level and target, so no measurement is served from a prompt cache that an earlier one "
        "filled. Set it to send the same prompts again on purpose (a warm-cache measurement)",
    )


def load_tokenizer(ref: str | None):
    if not ref:
        return None
    from transformers import AutoTokenizer

    from ..core import basemodel

    return AutoTokenizer.from_pretrained(basemodel.resolve(ref))


def from_file(path: Path, encoding: str = "utf-8") -> list[list[dict] | str]:
    """Prompts from a dataset file in any format and file type the data stage reads (ftx.core.rows): a conversation
    gives its messages up to the last assistant turn, a text row its text, a preference row its prompt. Rows with a
    `prompt` alone (a string or messages; `vllm bench serve`'s custom dataset) work too. A bad row is one error
    naming file:line and the field."""
    from ..core.rows import Options, RowError, detect, load, read_records

    records = read_records(path, encoding)
    if not records:
        raise FtxError("no prompts in the file", where=str(path))
    if any(detect(r) for _, r in records[:1]):
        examples, _ = load(path, options=Options(encoding=encoding))
        out = []
        for ex in examples:
            if "messages" in ex:
                msgs = ex["messages"]
                out.append([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]])
            else:
                out.append(ex.get("prompt") or ex["text"])
        return out
    out = []
    for where, row in records:
        if isinstance(row, RowError):
            raise FtxError(str(row), where=where)
        if isinstance(row, dict) and isinstance(row.get("prompt"), (str, list)) and row["prompt"]:
            out.append(row["prompt"])
        else:
            raise FtxError(
                "prompt: a row needs `messages`, `conversations`, `prompt`, `instruction` or `text`", where=where
            )
    return out


def synthetic(n_tokens: int, count: int, seed: int | list[int], tokenizer=None) -> list[str]:
    """`count` random-word prompts of exactly `n_tokens` tokens with a tokenizer (re-encoded and trimmed, as
    vLLM's random dataset does), else of `n_tokens` words (about as many tokens for English words)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n_tokens * 2)]
        if tokenizer is None:
            out.append(" ".join(words[:n_tokens]))
            continue
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:n_tokens]
        text = tokenizer.decode(ids)
        while (
            len(tokenizer.encode(text, add_special_tokens=False)) > n_tokens
        ):  # decode/encode is not always a round trip
            ids = ids[:-1]
            text = tokenizer.decode(ids)
        out.append(text)
    return out


class PromptSet:
    """A bench's prompts: one fixed list (held-out prompts, a file), rotated so that each level and target goes on
    where the one before stopped, or synthetic prompts drawn for each level and target from the run's seed (levels
    and targets never share a synthetic prompt)."""

    def __init__(self, fixed: list | None = None, synthetic: PromptsConfig | None = None, tokenizer=None):
        self.fixed, self.cfg, self.tokenizer, self._drawn = fixed, synthetic, tokenizer, {}
        self.counts: list[int] = []  # prompts each level sends per target (warmup included), set by the bench
        self.seed = None
        if synthetic is not None:
            import secrets

            self.seed = synthetic.seed if synthetic.seed is not None else secrets.randbits(31)

    def offset(self, level: int, target: int, targets: int = 1) -> int:
        """Where a level and target start in a fixed list: where the one before stopped."""
        if self.fixed is None or not self.counts:
            return 0
        return (sum(self.counts[:level]) * targets + target * self.counts[level]) % len(self.fixed)

    def get(self, level: int, target: int, targets: int = 1) -> list:
        if self.fixed is not None:  # rotated by the offset: fewer repeats
            k = self.offset(level, target, targets)
            return self.fixed[k:] + self.fixed[:k]
        if (level, target) not in self._drawn:
            c, seed = self.cfg, [self.seed, level, target]
            self._drawn[(level, target)] = synthetic(c.input_tokens, c.count, seed, self.tokenizer)
        return self._drawn[(level, target)]

    def describe(self) -> dict:
        if self.fixed is not None:
            return {"count": len(self.fixed), "seed": None, "fresh_per_level": False}
        return {"count": self.cfg.count, "seed": self.seed, "fresh_per_level": True}


def as_messages(p: list[dict] | str) -> list[dict]:
    return p if isinstance(p, list) else [{"role": "user", "content": p}]


def as_text(p: list[dict] | str) -> str:
    return (
        p if isinstance(p, str) else next((m["content"] for m in reversed(p) if m["role"] == "user"), p[-1]["content"])
    )


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def count_prompt_tokens(tokenizer, prompt: list[dict] | str, api: str) -> int:
    if api == "chat" and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            as_messages(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return len(ids)
    return count_tokens(tokenizer, as_text(prompt) if api == "completions" else str(prompt))
