"""The quality gate, format-agnostic: every exported variant is scored against the reference artifact on the
same token sequences, from the log-probabilities each assigns (Format.logprobs), with the metrics of
`llama-perplexity --kl-divergence`: KL(P_ref || P_variant) (mean, P99), the share of positions with the same
top-1 token, and PPL(variant) / PPL(reference). The smallest variant within the budgets is selected.

What is scored: the gate's figures are those of the tokens the served model produces - the assistant turns of
the held-out and validation conversations (every token of text rows). Prompt tokens (system, user, the
template's own tokens) are only shown, in the all-token figures, where a prefix shared by several conversations
(a default system prompt the chat template inserts into every one) is counted once: otherwise the same few
positions, repeated in every conversation, would outweigh the answers.

Default budgets from llama.cpp's LLaMA-3-8B scoreboard (tools/perplexity/README.md, wikitext-2): Q4_K_M has mean
KLD 0.031 and PPL ratio 1.028, Q4_0 0.072 and 1.075, Q5_K_M 0.011 and 1.011. Those are figures over plain text,
every token of which the model predicts as its own output; the gate applies them to the assistant tokens, the
closest equivalent. The defaults (0.05, 1.05) accept Q4_K_M-class quality and reject Q4_0-class. The PPL ratio is
checked both ways (|ratio - 1| <= max_ppl_ratio - 1): a quant that lowers perplexity by 10% has moved as far from
the reference as one that raises it by 10%."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.errors import FtxError


class QualityGate(BaseModel):
    """Budgets against the reference artifact (at least one; `quality_gate: null` turns the gate off)."""

    model_config = ConfigDict(extra="forbid")
    max_mean_kld: float | None = Field(0.05, gt=0, description="mean KL divergence from the reference")
    max_ppl_ratio: float | None = Field(
        1.05, gt=1, description="perplexity over the reference's, checked both ways: |ratio - 1| <= max - 1"
    )
    max_p99_kld: float | None = Field(None, gt=0, description="99th percentile of the per-token KL divergence")
    min_same_top: float | None = Field(None, gt=0, le=1, description="share of tokens with the reference's top-1")
    min_task_ratio: float | None = Field(
        None,
        gt=0,
        description="every task quality metric (higher is better: exact, token F1, ROUGE-L, ...) of the variant's "
        "held-out answers (export.termination's generations) at least this fraction of the reference's",
    )
    max_flip_rate: float | None = Field(
        None, ge=0, le=1, description="share of held-out answers whose pass/fail verdict differs from the reference's"
    )

    @model_validator(mode="after")
    def _some_budget(self):
        if all(v is None for v in self.model_dump().values()):
            raise ValueError(
                "every budget is null, so every variant would pass; set a budget or write "
                "`quality_gate: null` to keep every variant without a gate"
            )
        return self

    def within(self, m: dict) -> bool:
        ratios = [v for v in (m.get("task_ratio") or {}).values() if v is not None]
        checks = [
            (self.min_task_ratio, min(ratios) if ratios else None, ">="),
            (self.max_flip_rate, m.get("flip_rate"), "<="),
            (self.max_mean_kld, m["mean_kld"], "<="),
            (None if self.max_ppl_ratio is None else self.max_ppl_ratio - 1, abs(m["ppl_ratio"] - 1), "<="),
            (self.max_p99_kld, m["p99_kld"], "<="),
            (self.min_same_top, m["same_top"], ">="),
        ]
        return all(limit is None or v is None or (v <= limit if op == "<=" else v >= limit) for limit, v, op in checks)


class Positions:
    """Which predicted positions each figure counts. Position t of a sequence predicts token t + 1. `target`: the
    gate's positions (token t + 1 is an assistant token, i.e. labelled for training, or any token of a text row);
    `unique`: positions whose context and token were not already scored in an earlier sequence (a shared prefix
    counts once). Built from rendered rows (`input_ids`, `labels`); `every(seqs)` counts every position."""

    def __init__(self, rendered: list[dict]):
        import os

        import numpy as np

        target, unique, earlier = [], [], []
        for r in rendered:
            ids, labels = r["input_ids"], r["labels"]
            shared = max((len(os.path.commonprefix([ids, e])) for e in earlier), default=0)
            target.append(np.array([x != -100 for x in labels[1 : len(ids)]], dtype=bool))
            unique.append(np.arange(len(ids) - 1) >= shared - 1)
            earlier.append(ids)
        if not any(t.any() for t in target):  # no assistant token at all: score every unique position
            target = [u.copy() for u in unique]
        self._set(target, unique)

    @classmethod
    def every(cls, seqs: list[list[int]]) -> Positions:
        import numpy as np

        p = cls.__new__(cls)
        every = [np.ones(len(s) - 1, dtype=bool) for s in seqs]
        p._set(every, every)
        return p

    def _set(self, target: list, unique: list) -> None:
        import numpy as np

        self.target, self.unique = target, unique  # per sequence
        t, u = np.concatenate(target), np.concatenate(unique)
        self.flat = t, u  # the same, concatenated
        self.split = {
            "positions": int(t.size),
            "assistant": int(t.sum()),
            "prompt": int((~t).sum()),
            "prompt_repeated": int((~t & ~u).sum()),
            "assistant_repeated": int((t & ~u).sum()),
        }

    def ppls(self, nll) -> tuple[float, float]:
        """PPL on the gate's positions and on the unique ones, from the NLL at every position (flat)."""
        import math

        def ppl(mask) -> float:
            return math.exp(float(nll[mask].sum(dtype="float64")) / max(int(mask.sum()), 1))

        return ppl(self.flat[0]), ppl(self.flat[1])


def save_reference(logprobs: Iterable, seqs: list[list[int]], dst: Path, pos: Positions | None = None) -> dict:
    """Reference pass: log-probabilities at every position (fp16 on disk, memory-mapped); returns its PPL on the
    gate's positions (`ppl`) and on every unique position (`ppl_all`), to pass to `compare`."""
    import numpy as np

    pos = pos or Positions.every(seqs)
    store = None
    at, nlls = 0, []
    for lp, ids in logprobs:
        if store is None:
            store = np.lib.format.open_memmap(
                dst, mode="w+", dtype=np.float16, shape=(sum(map(len, seqs)), lp.shape[1])
            )
        store[at : at + len(ids)] = lp
        nlls.append(-lp[np.arange(len(ids) - 1), ids[1:]])
        at += len(ids)
    store.flush()
    ppl, ppl_all = pos.ppls(np.concatenate(nlls))
    return {"ppl": ppl, "ppl_all": ppl_all, "pos": pos}


def compare(logprobs: Iterable, ref: Path, reference: dict) -> dict[str, float]:
    """The gate's metrics of one variant against the saved reference, on the exact same token ids: on the gate's
    positions (ppl, ppl_ratio, mean_kld, p99_kld, same_top) and on every unique position (all_*)."""
    import numpy as np

    pos: Positions = reference["pos"]
    store = np.load(ref, mmap_mode="r")
    at, klds, tops, nlls = 0, [], [], []
    for lp, ids in logprobs:
        n = len(ids) - 1  # positions that predict a next token
        rp = np.asarray(store[at : at + n], dtype=np.float32)
        q = lp[:n]
        klds.append((np.exp(rp) * (rp - q)).sum(-1))
        tops.append(rp.argmax(-1) == q.argmax(-1))
        nlls.append(-q[np.arange(n), ids[1:]])
        at += len(ids)
    kld, top, nll = (np.concatenate(x) for x in (klds, tops, nlls))
    t, u = pos.flat
    ppl, ppl_all = pos.ppls(nll)
    return {
        "ppl": ppl,
        "ppl_ratio": ppl / reference["ppl"],
        "mean_kld": float(kld[t].mean()),
        "p99_kld": float(np.percentile(kld[t], 99)),
        "same_top": float(top[t].mean()),
        "all_mean_kld": float(kld[u].mean()),
        "all_ppl_ratio": ppl_all / reference["ppl_all"],
    }


def select(files: list, gate: QualityGate | None, reference: str, prefer: str | None = None) -> str:
    """The smallest variant within the gate (the smallest variant without a gate); the reference when there are
    no variants; `prefer` (the variant searched to the user's size budget) when it is within the gate. Nothing
    within the gate: one error with the whole table."""
    variants = sorted([f for f in files if f.name != reference], key=lambda f: f.size_bytes)
    ok = [f for f in variants if f.passed is not False]
    if variants and not ok:
        table = "; ".join(
            f"{f.name}: KLD {f.mean_kld:.4f}, PPL ratio {f.ppl_ratio:.3f}, P99 KLD {f.p99_kld:.3f}, "
            f"same top {f.same_top:.1%}"
            + (f", clean stops {f.clean_stop_rate:.0%}" if f.clean_stop_rate is not None else "")
            for f in variants
        )
        raise FtxError(
            f"no quant passes export.quality_gate ({gate.model_dump(exclude_none=True) if gate else 'off'}) "
            f"and export.termination: {table}; "
            "relax the budgets or add larger quants"
        )
    if prefer in {f.name for f in ok}:
        return prefer
    return ok[0].name if ok else reference
