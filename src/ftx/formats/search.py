"""Quant search to a size budget, format-agnostic: per group of tensors, which quant type, so that the file fits
`export.target` with the lowest KL divergence from the reference.

A format cuts its model into units (GGUF: one tensor kind - attn_q, ffn_down, ... - over a block of layers, and
the token embedding) and says, per unit, which types it may take and what each costs in bytes. The search then

1. measures every unit's sensitivity: the model with every unit at its largest type, and per unit the same with
   that unit alone at its smallest type and at a middle one; the KLD that adds is the unit's cost at that type,
2. models a unit's KLD at its other types log-linearly in bits per weight between those points (quantization
   noise falls geometrically with every added bit) and adds the units' figures,
3. allocates the bytes: the one type per unit with the lowest predicted total that fits the budget (a
   multiple-choice knapsack, solved exactly by dynamic programming over the bytes),
4. builds and measures the allocation, and the largest of the format's standard mixtures that fits the budget
   (as it is, and with its types per group),
5. refines the better per-group candidate by measured local search (one group a type up, another a type down,
   in the order the curves predict saves the most; a step is kept only if the file measures better), and keeps
   the best file measured: never worse than what the format would have made at that size.

The KLD it minimises is measured on the training conversations (`calibration`), never on the quality gate's
held-out text, so the gate's figure for the searched file is not the one it was chosen on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.errors import FtxError

STEPS = 20000  # byte resolution of the allocation (room / STEPS)


class Target(BaseModel):
    """`export.target`: one size budget (a file size or bits per weight) for a searched variant."""

    model_config = ConfigDict(extra="forbid")
    max_mb: float | None = Field(None, gt=0, description="the searched file's size budget in MB (10^6 bytes)")
    max_bits_per_weight: float | None = Field(
        None, gt=1, le=16, description="the budget as bits per weight (tensor data bits / weights, as llama.cpp's BPW)"
    )
    search_tokens: int = Field(
        2048, ge=128, description="training-conversation tokens each candidate is scored on (KLD vs the reference)"
    )
    blocks: int = Field(4, ge=1, description="layer blocks per tensor kind: each block of each kind gets its own type")
    refine_evals: int = Field(
        24, ge=0, description="measured local-search steps after the allocation (each builds and scores one file)"
    )

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.max_mb is None) == (self.max_bits_per_weight is None):
            raise ValueError("give exactly one of max_mb and max_bits_per_weight")
        return self

    def budget(self, weights: int, overhead: int) -> int:
        """The budget in bytes of the whole file (`overhead`: bytes outside the tensor data, metadata)."""
        if self.max_mb is not None:
            return int(self.max_mb * 1e6)
        return int(self.max_bits_per_weight * weights / 8) + overhead


@dataclass
class Unit:
    """Tensors that take one type together. `options`: (type, bytes of the unit's tensors at that type, bits per
    weight), smallest first."""

    name: str
    options: list[tuple[str, int, float]]

    def size(self, qtype: str) -> int:
        return next(b for t, b, _ in self.options if t == qtype)

    def index(self, qtype: str) -> int:
        return next(i for i, (t, _, _) in enumerate(self.options) if t == qtype)


def total(units: list[Unit], types: dict[str, str], fixed_bytes: int) -> int:
    """The file's bytes with `types`: the units' at their types plus everything else."""
    return fixed_bytes + sum(u.size(types[u.name]) for u in units)


class SearchResult(BaseModel):
    budget_bytes: int
    size_bytes: int
    mean_kld: float = Field(description="on the search text (training conversations), vs the reference")
    predicted_kld: float | None = Field(description="what the additive model predicted for the allocation")
    kept: str = Field(
        description="allocation, refined, '<mixture> per group' (per-group types) or the standard mixture that won"
    )
    types: dict[str, str] = Field(
        description="unit -> quant type of the kept candidate (the allocation's if a mixture)"
    )
    sensitivity: dict[str, list[float | None]] = Field(
        description="unit -> KLD added by that unit alone at each of its types (measured, or None: modelled)"
    )
    evaluations: int = Field(description="files built and scored")
    tried: list[dict] = Field(default_factory=list, description="each candidate before refining: name, bytes, KLD")
    refine: list[dict] = Field(default_factory=list, description="each measured local-search step: move, KLD, kept")


def curve(u: Unit, measured: dict[int, float]) -> list[float]:
    """A unit's KLD at each of its types from the ones measured (index -> added KLD; the largest type adds 0):
    log-linear in bits per weight through the measured points, the last slope carried on (4x per bit with one
    point), never rising with more bits."""
    import math

    pts = sorted((u.options[i][2], math.log(max(k, 1e-9))) for i, k in measured.items())
    out = []
    for i, (_, _, bpw) in enumerate(u.options):
        if i == len(u.options) - 1:
            out.append(0.0)
            continue
        if i in measured:
            out.append(max(measured[i], 1e-9))
            continue
        lo = max((p for p in pts if p[0] <= bpw), default=pts[0])
        hi = min((p for p in pts if p[0] > bpw), default=None)
        if hi is None and len(pts) > 1:
            lo, hi = pts[-2], pts[-1]
        slope = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi else -math.log(4)
        out.append(math.exp(lo[1] + min(slope, -math.log(1.2)) * (bpw - lo[0])))
    return out


def allocate(units: list[Unit], klds: dict[str, list[float]], room: int) -> dict[str, str]:
    """The allocation with the lowest predicted KLD (the units' figures added up, `klds`: unit -> KLD at each
    option) whose bytes above the all-smallest size fit in `room`: a multiple-choice knapsack, solved exactly by
    dynamic programming over the bytes in `STEPS` steps (each option's cost rounded up to whole steps, so what fits
    the steps fits the bytes)."""
    import numpy as np

    if room <= 0:
        return {u.name: u.options[0][0] for u in units}
    step = max(1, -(-room // STEPS))
    slots = room // step
    best = np.zeros(slots + 1)  # lowest predicted KLD of the units so far within c steps
    picks = []
    for u in units:
        low = u.options[0]
        new = np.full(slots + 1, np.inf)
        pick = np.zeros(slots + 1, dtype=np.int32)
        for i, (_, b, _) in enumerate(u.options):
            cost = -(-(b - low[1]) // step)
            if cost > slots:
                continue
            cand = np.full(slots + 1, np.inf)
            cand[cost:] = best[: slots + 1 - cost] + klds[u.name][i]
            better = cand < new
            new[better], pick[better] = cand[better], i
        best = new
        picks.append(pick)
    types, c = {}, slots
    for u, pick in zip(reversed(units), reversed(picks)):  # walk the choices back
        i = int(pick[c])
        types[u.name] = u.options[i][0]
        c -= -(-(u.options[i][1] - u.options[0][1]) // step)
    return {u.name: types[u.name] for u in units}


def fit(
    units: list[Unit], klds: dict[str, list[float]], types: dict[str, str], fixed_bytes: int, budget: int
) -> dict[str, str] | None:
    """`types` made to fit the budget by the downgrades that cost the least predicted KLD per byte saved (a mixture's
    per-group types can be a little larger than the mixture itself); None when even that cannot fit."""
    types = dict(types)
    while total(units, types, fixed_bytes) > budget:
        best = None
        for u in units:
            i = u.index(types[u.name])
            if i == 0:
                continue
            saved = u.size(types[u.name]) - u.options[i - 1][1]
            cost = (klds[u.name][i - 1] - klds[u.name][i]) / max(saved, 1)
            if best is None or cost < best[0]:
                best = (cost, u.name, u.options[i - 1][0])
        if best is None:
            return None
        types[best[1]] = best[2]
    return types


def refine(
    units: list[Unit],
    klds: dict[str, list[float]],
    start: tuple[dict[str, str], float, int],
    fixed_bytes: int,
    budget: int,
    measure: Callable[[dict[str, str]], tuple[float, int]],
    evals: int,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[dict[str, str], float, int, list[dict]]:
    """Measured local search from `start` (types, KLD, bytes): the move the curves predict saves the most KLD - one
    group a type up, paid for by one or two others a type down when the budget needs it - is built and measured;
    kept if the file measures better, remembered as rejected otherwise (and a group whose going up was rejected twice
    waits for the next kept step); at most `evals` files. The measurements, not the additive model, decide: KLD
    from many quantized groups is not the sum of each group's alone."""
    by_name = {u.name: u for u in units}
    types, kld, kept_bytes = dict(start[0]), start[1], start[2]
    rejected, steps = set(), []
    tries: dict[str, int] = {}  # rejected moves per group going up since the last kept step: at most 2 each

    def size(ts: dict[str, str]) -> int:
        return total(units, ts, fixed_bytes)

    def step(name: str, ts: dict[str, str], d: int) -> tuple[dict[str, str], float] | None:
        """`name` d types up (or down), with the predicted KLD that saves (negative: costs)."""
        u = by_name[name]
        i = u.index(ts[name])
        if not 0 <= i + d < len(u.options):
            return None
        return {**ts, name: u.options[i + d][0]}, klds[name][i] - klds[name][i + d]

    while evals > 0:
        moves = []
        for u in units:
            up = step(u.name, types, +1)
            if up is None or tries.get(u.name, 0) >= 2:
                continue
            if size(up[0]) <= budget:
                moves.append((up[1], up[0], f"{u.name} up", u.name))
                continue
            for v in units:  # paid for by one or two other groups a type down
                down = step(v.name, up[0], -1) if v.name != u.name else None
                if not down:
                    continue
                if size(down[0]) <= budget:
                    moves.append((up[1] + down[1], down[0], f"{u.name} up, {v.name} down", u.name))
                    continue
                for w in units:
                    again = step(w.name, down[0], -1) if w.name not in (u.name, v.name) and w.name > v.name else None
                    if again and size(again[0]) <= budget:
                        moves.append(
                            (up[1] + down[1] + again[1], again[0], f"{u.name} up, {v.name}+{w.name} down", u.name)
                        )
        # every move, not only those the additive model likes: the start may be that model's own optimum
        moves = [m for m in moves if tuple(sorted(m[1].items())) not in rejected]
        if not moves:
            break
        _, cand, what, group = max(moves, key=lambda m: m[0])
        progress(f"quant search: refining ({evals} left): {what}")
        got, nbytes = measure(cand)
        evals -= 1
        better = got < kld and nbytes <= budget
        steps.append({"move": what, "mean_kld": got, "kept": better})
        if better:
            types, kld, kept_bytes = cand, got, nbytes
            tries.clear()
        else:
            rejected.add(tuple(sorted(cand.items())))
            tries[group] = tries.get(group, 0) + 1
    return types, kld, kept_bytes, steps


def search(
    units: list[Unit],
    fixed_bytes: int,
    budget: int,
    measure: Callable[[dict[str, str]], tuple[float, int]],
    progress: Callable[[str], None] = lambda _: None,
    presets: dict[str, Callable[[], tuple[float, int, dict[str, str] | None]]] | None = None,
    refine_evals: int = 0,
) -> SearchResult:
    """Run the search. `fixed_bytes`: everything outside the units (other tensors, metadata); `measure(types)`:
    build the file with those types, return (mean KLD on the search text, file bytes); `presets`: the format's
    standard mixtures that fit the budget (name -> build and measure: KLD, bytes and the mixture's type per unit
    where it has one), candidates too, so the search never keeps an allocation worse than what the format would
    have made at that size; then `refine_evals` measured steps of local search from the better unit-level start
    (the allocation, or a mixture's per-unit types). The caller rebuilds the kept file (`kept`, `types`)."""
    smallest = fixed_bytes + sum(u.options[0][1] for u in units)
    if smallest > budget:
        raise FtxError(
            f"export.target: {budget / 1e6:.1f} MB is below the smallest file the search may build "
            f"({smallest / 1e6:.1f} MB, every tensor group at its smallest type)"
        )
    top = {u.name: u.options[-1][0] for u in units}
    progress(f"quant search: baseline, every group at its largest type ({len(units)} groups)")
    base_kld, _ = measure(top)
    measured: dict[str, dict[int, float]] = {}
    for n, u in enumerate(units):
        measured[u.name] = {}
        for i in sorted({0, (len(u.options) - 1) // 2}):  # the smallest type and one in the middle
            progress(f"quant search: sensitivity {n + 1}/{len(units)}: {u.name} at {u.options[i][0]}")
            kld, _ = measure({**top, u.name: u.options[i][0]})
            measured[u.name][i] = max(kld - base_kld, 1e-9)
    klds = {u.name: curve(u, measured[u.name]) for u in units}
    types = allocate(units, klds, budget - smallest)
    pred = base_kld + sum(klds[u.name][u.index(types[u.name])] for u in units)
    progress("quant search: building the allocation")
    kld, nbytes = measure(types)
    tried = [{"name": "allocation", "mean_kld": kld, "size_bytes": nbytes, "types": types}]
    for name, build in (presets or {}).items():
        progress(f"quant search: the standard mixture {name} at this budget")
        kld, nbytes, groups = build()
        tried.append({"name": name, "mean_kld": kld, "size_bytes": nbytes, "types": None})
        groups = fit(units, klds, groups, fixed_bytes, budget) if groups else None
        if groups:
            progress(f"quant search: {name}'s types per group")
            kld, nbytes = measure(groups)
            tried.append({"name": f"{name} per group", "mean_kld": kld, "size_bytes": nbytes, "types": groups})
    fits = [t for t in tried if t["size_bytes"] <= budget]
    if not fits:
        raise FtxError(f"export.target: no candidate fits {budget / 1e6:.1f} MB (tried: {tried})")
    steps = []
    starts = [t for t in fits if t["types"]]
    if refine_evals and starts:
        start = min(starts, key=lambda t: t["mean_kld"])
        got, kld, nbytes, steps = refine(
            units,
            klds,
            (start["types"], start["mean_kld"], start["size_bytes"]),
            fixed_bytes,
            budget,
            measure,
            refine_evals,
            progress,
        )
        if got != start["types"]:
            fits.append({"name": "refined", "mean_kld": kld, "size_bytes": nbytes, "types": got})
    kept = min(fits, key=lambda t: t["mean_kld"])
    return SearchResult(
        budget_bytes=budget,
        size_bytes=kept["size_bytes"],
        mean_kld=kept["mean_kld"],
        predicted_kld=pred,
        kept=kept["name"],
        types=kept["types"] or types,
        sensitivity={u.name: [measured[u.name].get(i) for i in range(len(u.options))] for u in units},
        evaluations=1 + sum(map(len, measured.values())) + len(tried) + len(steps),
        tried=[{k: v for k, v in t.items() if k != "types"} for t in tried],
        refine=steps,
    )
