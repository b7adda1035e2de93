"""95% bootstrap intervals for per-example scores, and for the paired difference of two models scored on the same
examples (resampling examples, not models, so what both got right or wrong together cancels out). Percentile
bootstrap with a fixed seed: the same answers give the same interval."""

from __future__ import annotations

RESAMPLES = 2000


def _resampled_means(columns: list[list[float]], seed: int):
    import numpy as np

    data = np.asarray(columns, dtype=np.float64)  # [k, n]
    n = data.shape[1]
    idx = np.random.default_rng(seed).integers(0, n, (RESAMPLES, n))
    return data[:, idx].mean(-1)  # [k, RESAMPLES]


def interval(values: list[float], seed: int = 0) -> list[float]:
    """[low, high] of the mean of `values` (95%)."""
    import numpy as np

    if len(values) < 2:
        return [float(np.mean(values)), float(np.mean(values))] if values else [0.0, 0.0]
    means = _resampled_means([values], seed)[0]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_delta(a: list[float], b: list[float], seed: int = 0) -> dict[str, float]:
    """mean(b) - mean(a) with its 95% interval, the examples resampled together."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError("paired scores need the same examples")
    delta = float(np.mean(b) - np.mean(a)) if a else 0.0
    if len(a) < 2:
        return {"delta": delta, "low": delta, "high": delta}
    means = _resampled_means([a, b], seed)
    diff = means[1] - means[0]
    return {"delta": delta, "low": float(np.percentile(diff, 2.5)), "high": float(np.percentile(diff, 97.5))}


CORPUS_RESAMPLES = 1000  # a corpus figure is recomputed per resample (sacreBLEU on the resampled answers)


def _indices(n: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, (CORPUS_RESAMPLES, n))


def interval_of(stat, n: int, seed: int = 0) -> list[float]:
    """[low, high] (95%) of a corpus statistic `stat(indices) -> float` of n examples, the examples resampled."""
    import numpy as np

    if n < 2:
        v = stat(np.arange(n))
        return [v, v]
    values = [stat(idx) for idx in _indices(n, seed)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def paired_of(stat_a, stat_b, n: int, seed: int = 0) -> dict[str, float]:
    """stat_b - stat_a (corpus statistics of the same n examples) with its 95% interval, resampled together."""
    import numpy as np

    delta = stat_b(np.arange(n)) - stat_a(np.arange(n))
    if n < 2:
        return {"delta": delta, "low": delta, "high": delta}
    diff = [stat_b(idx) - stat_a(idx) for idx in _indices(n, seed)]
    return {"delta": delta, "low": float(np.percentile(diff, 2.5)), "high": float(np.percentile(diff, 97.5))}
