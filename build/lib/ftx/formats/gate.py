"""The quality gate, format-agnostic: every exported variant is scored against the reference artifact on the
same token sequences, from the log-probabilities each assigns (Format.logprobs), with the metrics of
`llama-perplexity --kl-divergence`: KL(P_ref || P_variant) at every predicted position (mean, P99), the share of
positions with the same top-1 token, and PPL(variant) / PPL(reference). The smallest variant within the
budgets is selected.

Default budgets from llama.cpp's LLaMA-3-8B scoreboard (tools/perplexity/README.md, wikitext-2): Q4_K_M has mean
KLD 0.031 and PPL ratio 1.028, Q4_0 0.072 and 1.075, Q5_K_M 0.011 and 1.011. The defaults (0.05, 1.05) accept
Q4_K_M-class quality and reject Q4_0-class."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.errors import FtxError


class QualityGate(BaseModel):
    """Budgets against the reference artifact (at least one; `quality_gate: null` turns the gate off)."""

    model_config = ConfigDict(extra="forbid")
    max_mean_kld: float | None = Field(0.05, gt=0, description="mean KL divergence from the reference")
    max_ppl_ratio: float | None = Field(1.05, gt=1, description="perplexity over the reference's")
    max_p99_kld: float | None = Field(None, gt=0, description="99th percentile of the per-token KL divergence")
    min_same_top: float | None = Field(None, gt=0, le=1, description="share of tokens with the reference's top-1")

    @model_validator(mode="after")
    def _some_budget(self):
        if all(v is None for v in self.model_dump().values()):
            raise ValueError(
                "every budget is null, so every variant would pass; set a budget or write "
                "`quality_gate: null` to keep every variant without a gate"
            )
        return self

    def within(self, m: dict) -> bool:
        checks = [
            (self.max_mean_kld, m["mean_kld"], "<="),
            (self.max_ppl_ratio, m["ppl_ratio"], "<="),
            (self.max_p99_kld, m["p99_kld"], "<="),
            (self.min_same_top, m["same_top"], ">="),
        ]
        return all(limit is None or (v <= limit if op == "<=" else v >= limit) for limit, v, op in checks)


def save_reference(logprobs: Iterable, seqs: list[list[int]], dst: Path) -> float:
    """Reference pass: log-probabilities at every position (fp16 on disk, memory-mapped); returns its PPL."""
    import numpy as np

    store = None
    at, nll, n = 0, 0.0, 0
    for lp, ids in logprobs:
        if store is None:
            store = np.lib.format.open_memmap(
                dst, mode="w+", dtype=np.float16, shape=(sum(map(len, seqs)), lp.shape[1])
            )
        store[at : at + len(ids)] = lp
        nll -= float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
        n, at = n + len(ids) - 1, at + len(ids)
    store.flush()
    return float(np.exp(nll / n))


def compare(logprobs: Iterable, ref: Path, ref_ppl: float) -> dict[str, float]:
    """The gate's metrics of one variant against the saved reference, on the exact same token ids."""
    import numpy as np

    store = np.load(ref, mmap_mode="r")
    at, nll, klds, same = 0, 0.0, [], 0
    for lp, ids in logprobs:
        n = len(ids) - 1  # positions that predict a next token
        rp = np.asarray(store[at : at + n], dtype=np.float32)
        q = lp[:n]
        klds.append((np.exp(rp) * (rp - q)).sum(-1))
        same += int((rp.argmax(-1) == q.argmax(-1)).sum())
        nll -= float(q[np.arange(n), ids[1:]].sum())
        at += len(ids)
    kld = np.concatenate(klds)
    ppl = float(np.exp(nll / len(kld)))
    return {
        "ppl": ppl,
        "ppl_ratio": ppl / ref_ppl,
        "mean_kld": float(kld.mean()),
        "p99_kld": float(np.percentile(kld, 99)),
        "same_top": same / len(kld),
    }


def select(files: list, gate: QualityGate | None, reference: str) -> str:
    """The smallest variant within the gate (the smallest variant without a gate); the reference when there are
    no variants. Nothing within the gate: one error with the whole table."""
    variants = sorted([f for f in files if f.name != reference], key=lambda f: f.size_bytes)
    ok = [f for f in variants if f.passed is not False]
    if variants and not ok:
        table = "; ".join(
            f"{f.name}: KLD {f.mean_kld:.4f}, PPL ratio {f.ppl_ratio:.3f}, P99 KLD {f.p99_kld:.3f}, "
            f"same top {f.same_top:.1%}"
            for f in variants
        )
        raise FtxError(
            f"no quant passes export.quality_gate ({gate.model_dump(exclude_none=True)}): {table}; "
            "relax the budgets or add larger quants"
        )
    return ok[0].name if ok else reference
