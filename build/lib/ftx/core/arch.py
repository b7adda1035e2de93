"""Model architecture facts from a config.json (or a table of well-known models, so nothing is downloaded): layer
shapes for the memory planner and for checking that an adapter fits its base model."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from .errors import FtxError

# Architectures of common base models, from their config.json on the Hugging Face hub, so a plan for a model
# that is not on this machine needs no download. (layers, hidden, intermediate, heads, kv_heads, head_dim,
# vocab, tied embeddings)
KNOWN = {
    "smollm2-135m-instruct": (30, 576, 1536, 9, 3, 64, 49152, True),
    "meta-llama/Llama-3.2-1B-Instruct": (16, 2048, 8192, 32, 8, 64, 128256, True),
    "meta-llama/Llama-3.2-3B-Instruct": (28, 3072, 8192, 24, 8, 128, 128256, True),
    "meta-llama/Llama-3.1-8B-Instruct": (32, 4096, 14336, 32, 8, 128, 128256, False),
    "mistralai/Mistral-7B-Instruct-v0.3": (32, 4096, 14336, 32, 8, 128, 32768, False),
    "Qwen/Qwen2.5-7B-Instruct": (28, 3584, 18944, 28, 4, 128, 152064, False),
    "Qwen/Qwen2.5-14B-Instruct": (48, 5120, 13824, 40, 8, 128, 152064, False),
}


class Arch(BaseModel):
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block (llama-style: GQA attention + SwiGLU MLP)."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def params(self) -> dict[str, int]:
        linear = self.layers * sum(a * b for a, b in self.linear_shapes().values())
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        return {"linear": linear, "embed": embed, "norms": norms, "total": linear + embed + norms}


def arch_of(model: str) -> Arch:
    if model in KNOWN:
        return Arch(**dict(zip(Arch.model_fields, KNOWN[model])))
    from .basemodel import PACKAGED, resolve

    path = resolve(model) if model in PACKAGED else Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FtxError(f"model {model!r}: not a local dir with config.json nor a known model ({', '.join(KNOWN)})")
    c = json.loads((path / "config.json").read_text())
    heads = c["num_attention_heads"]
    return Arch(
        layers=c["num_hidden_layers"],
        hidden=c["hidden_size"],
        intermediate=c["intermediate_size"],
        heads=heads,
        kv_heads=c.get("num_key_value_heads", heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        vocab=c["vocab_size"],
        tied=c.get("tie_word_embeddings", False),
    )
