"""The size-budget quant search's logic (ftx.formats.search) on synthetic units whose KLD is known exactly; the real
search on the quickstart GGUF runs in tests/test_e2e_export.py and bench/quant_search.py."""

import itertools

import pytest
from pydantic import ValidationError

from ftx.core.errors import FtxError
from ftx.formats.search import Target, Unit, allocate, curve, fit, refine, search

BPW = {"q4": 4.5, "q5": 5.5, "q8": 8.5}


def unit(name: str, weights: int) -> Unit:
    return Unit(name, [(t, int(weights * b / 8), b) for t, b in BPW.items()])


UNITS = [unit("embd", 4000), unit("attn", 1000), unit("ffn", 3000), unit("out", 500)]
SENS = {"embd": 0.02, "attn": 0.004, "ffn": 0.01, "out": 0.03}


def true_kld(types: dict[str, str]) -> float:
    """A model the search does not know exactly: 3.5x per bit (its rules are 4x and 2x), plus a floor."""
    return 0.001 + sum(SENS[u] * 3.5 ** -(BPW[t] - 4.5) for u, t in types.items())


def size(types: dict[str, str]) -> int:
    return 100 + sum(u.size(types[u.name]) for u in UNITS)


def test_target_takes_exactly_one_budget():
    assert Target(max_mb=100).budget(10**9, 5) == 100_000_000
    assert Target(max_bits_per_weight=4.0).budget(1000, 7) == 507  # tensor bits / weights, plus the metadata
    for bad in ({}, {"max_mb": 1, "max_bits_per_weight": 4}):
        with pytest.raises(ValidationError, match="exactly one of max_mb and max_bits_per_weight"):
            Target(**bad)


def klds(per_bit: float = 4.0) -> dict[str, list[float]]:
    return {u: [k * per_bit ** -(b - 4.5) for b in BPW.values()] for u, k in SENS.items()}


def test_curve_through_the_measured_points():
    u = UNITS[0]
    c = curve(u, {0: 0.016, 1: 0.004})  # 4x per bit between q4 (4.5) and q5 (5.5)
    assert c[:2] == [0.016, 0.004] and c[2] == 0.0  # the largest type is the baseline
    flat = curve(u, {0: 0.01, 1: 0.02})  # noise: more bits measured worse -> still falls (1.2x per bit at least)
    assert flat[1] == 0.02 and flat[0] == 0.01
    three = Unit("x", [*u.options[:2], ("q6", 700, 6.5), u.options[2]])
    c = curve(three, {0: 0.016, 1: 0.004})
    assert c[2] == pytest.approx(0.004 / 4) and c[3] == 0.0  # the last slope carried on


def test_allocation_fits_and_is_the_best_the_model_predicts():
    smallest = sum(u.options[0][1] for u in UNITS)
    for room in (0, 500, 2000, 5000, 10**6):
        types = allocate(UNITS, klds(), room)
        assert sum(u.size(types[u.name]) for u in UNITS) - smallest <= room
    assert allocate(UNITS, klds(), 0) == {u.name: "q4" for u in UNITS}
    assert allocate(UNITS, klds(), 10**6) == {u.name: "q8" for u in UNITS}
    # a little room goes to the small, sensitive output tensor and the small attention, not to the large embedding
    assert allocate(UNITS, klds(), 200) == {"embd": "q4", "attn": "q5", "ffn": "q4", "out": "q5"}
    assert allocate(UNITS, klds(), 100) == {"embd": "q4", "attn": "q4", "ffn": "q4", "out": "q5"}
    # exhaustive check of the dynamic programme: the lowest predicted total of every allocation that fits
    k = klds(3.0)
    for room in (300, 900, 1700, 2600):
        types = allocate(UNITS, k, room)
        got = sum(k[u][list(BPW).index(t)] for u, t in types.items())
        best = min(
            sum(k[u.name][list(BPW).index(t)] for u, t in zip(UNITS, combo))
            for combo in itertools.product(BPW, repeat=len(UNITS))
            if sum(u.size(t) for u, t in zip(UNITS, combo)) - smallest <= room
        )
        assert got == pytest.approx(best), room


@pytest.mark.parametrize("budget", [4900, 5600, 6500, 8000])
def test_search_is_near_the_exhaustive_optimum_and_never_worse_than_a_preset(budget):
    evaluations = []

    def measure(types):
        evaluations.append(dict(types))
        return true_kld(types), size(types)

    preset = {"embd": "q5", "attn": "q5", "ffn": "q5", "out": "q5"}  # a fixed mixture, like llama.cpp's
    presets = {"Q5": lambda: (true_kld(preset), size(preset), None)} if size(preset) <= budget else {}
    result = search(UNITS, 100, budget, measure, presets=presets)
    assert result.size_bytes <= budget and result.evaluations == len(evaluations) + len(presets)
    assert len(evaluations) == 1 + 2 * len(UNITS) + 1  # baseline, two types per unit, the allocation (no refining)
    # each unit alone at its smallest and middle type, the rest at q8: exactly what it adds
    for u in SENS:
        assert result.sensitivity[u][0] == pytest.approx(SENS[u] * (1 - 3.5**-4), rel=1e-6)
        assert result.sensitivity[u][1] == pytest.approx(SENS[u] * (3.5**-1 - 3.5**-4), rel=1e-6)
        assert result.sensitivity[u][2] is None
    kept = preset if result.kept == "Q5" else result.types
    assert result.mean_kld == pytest.approx(true_kld(kept)) and result.size_bytes == size(kept)
    best = min(
        true_kld(t)
        for combo in itertools.product(BPW, repeat=len(UNITS))
        if size(t := dict(zip([u.name for u in UNITS], combo))) <= budget
    )
    assert result.mean_kld <= best * 1.05, (result.mean_kld, best)
    if presets:  # never worse than the fixed mixture
        assert result.mean_kld <= true_kld(preset)


def test_a_preset_that_measures_better_is_kept():
    result = search(UNITS, 100, 8000, lambda types: (1.0, size(types)), presets={"P": lambda: (0.5, 7000, None)})
    assert result.kept == "P" and result.mean_kld == 0.5 and result.size_bytes == 7000


def test_refining_by_measurement_beats_an_additive_model_that_is_wrong():
    """True KLD that is not additive: the embedding's error is amplified by every other group's (as quantization
    errors compound through layers). The search keeps the best file it measured; measured local search keeps only
    steps that measure better, and from a mixture that leaves the embedding low it gets well below the mixture."""
    fine = {"q4": 4.5, "q4_1": 5.0, "q5": 5.5, "q5_1": 6.0, "q6": 6.5, "q7": 7.5, "q8": 8.5}
    units = [
        Unit(n, [(t, int(w * b / 8), b) for t, b in fine.items()])
        for n, w in (("embd", 4000), ("attn", 1000), ("ffn", 3000), ("out", 500))
    ]

    def compounding(types):
        err = {u: SENS[u] * 3.5 ** -(fine[t] - 4.5) for u, t in types.items()}
        return 0.001 + sum(err.values()) + 400 * err["embd"] * (err["attn"] + err["ffn"] + err["out"])

    def size(types):
        return 100 + sum(u.size(types[u.name]) for u in units)

    def measure(types):
        return compounding(types), size(types)

    mixture = {"embd": "q5", "attn": "q4", "ffn": "q5", "out": "q5"}  # a mixture that leaves the embedding low
    budget = size(mixture) + 300
    result = search(units, 100, budget, measure, presets={"M": lambda: (*measure(mixture), mixture)}, refine_evals=16)
    assert [t["name"] for t in result.tried] == ["allocation", "M", "M per group"]
    assert result.evaluations == 1 + 2 * 4 + 3 + len(result.refine)
    assert result.mean_kld <= min(t["mean_kld"] for t in result.tried)
    assert result.mean_kld == pytest.approx(compounding(result.types)) and size(result.types) <= budget
    # from the mixture's per-group types, measured steps only ever go down, and get well below where they began
    klds = {u.name: curve(u, {0: SENS[u.name], 3: SENS[u.name] / 3.5**1.5}) for u in units}
    start = (mixture, compounding(mixture), size(mixture))
    types, kld, nbytes, steps = refine(units, klds, start, 100, budget, measure, 16)
    kept = [r["mean_kld"] for r in steps if r["kept"]]
    assert steps and kept == sorted(kept, reverse=True) and kld == min(kept) < 0.8 * compounding(mixture)
    assert kld == pytest.approx(compounding(types)) and nbytes == size(types) <= budget and len(steps) <= 16


def test_budget_below_the_smallest_file_is_refused_before_any_build():
    with pytest.raises(FtxError, match="below the smallest file the search may build"):
        search(UNITS, 100, 4000, lambda types: pytest.fail("built a file"))


def test_a_mixture_per_group_is_made_to_fit_by_the_cheapest_downgrades():
    big = {"embd": "q8", "attn": "q8", "ffn": "q5", "out": "q8"}
    k = klds()
    fitted = fit(UNITS, k, big, 100, size(big) - 200)
    assert size(fitted) <= size(big) - 200 and fitted["embd"] == "q8" and fitted["out"] == "q8"
    assert fitted["attn"] == "q5"  # the least predicted KLD lost per byte saved
    assert fit(UNITS, k, big, 100, size(big)) == big
    assert fit(UNITS, k, big, 100, 1000) is None  # below even every group at its smallest type
