"""Uncertainty for testbed measurements: Wilson intervals and exact McNemar tests for shares
(accuracy, agreement with the unpruned answer), bootstrap intervals and paired sign-flip tests for
means (the answer distribution's KL), and the smallest difference a paired test can detect.

Every accuracy the testbed reports is a share of ``n`` independent questions, so it carries a
Wilson score interval (good at small ``n`` and near 0 or 1, where the normal approximation is not).
Two methods answer the *same* questions, so they are compared by a paired test: McNemar's, on the
questions where exactly one of them is right, computed exactly from the binomial distribution (no
continuity correction, no large-count approximation). A mean of a per-question quantity with a
heavy tail (KL divergence) carries a percentile bootstrap interval, and two methods' means are
compared by a paired sign-flip permutation test on the per-question differences; both draw from a
fixed seed, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["Z95", "wilson", "mcnemar", "paired_se", "bootstrap_mean", "paired_mean_test", "detectable"]

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (``(0, 1)`` when ``n = 0``)."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: rounding must not leave p-hat outside
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def _binom_two_sided(b: int, n: int) -> float:
    """Exact two-sided p of ``b`` successes in ``n`` fair-coin trials (twice the smaller tail)."""
    if n == 0:
        return 1.0
    k = min(b, n - b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | int]:
    """Exact McNemar test of two methods' correctness on the same questions.

    Returns ``a_only`` (questions ``a`` gets right and ``b`` wrong), ``b_only``, ``delta``
    (accuracy of ``a`` minus ``b``), ``se`` (the paired standard error of ``delta``) and ``p``
    (exact two-sided p-value under "equally good": ``a_only ~ Binomial(a_only + b_only, 1/2)``).
    """
    if len(a) != len(b):
        raise ValueError(f"mcnemar: the two methods answered {len(a)} and {len(b)} questions; pair the same ones")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = len(a)
    return {"a_only": a_only, "b_only": b_only, "delta": (a_only - b_only) / n if n else 0.0,
            "se": paired_se(a_only, b_only, n), "p": _binom_two_sided(a_only, a_only + b_only)}


def paired_se(a_only: int, b_only: int, n: int) -> float:
    """Standard error of a paired accuracy difference from its discordant counts."""
    if n == 0:
        return 0.0
    p10, p01 = a_only / n, b_only / n
    return math.sqrt(max(0.0, p10 + p01 - (p10 - p01) ** 2) / n)


def bootstrap_mean(values: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (``(nan, nan)`` when empty).

    ``resamples`` resamples of the questions with replacement, drawn from a fixed ``seed`` so a
    report is reproducible; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the resampled means. Batched: one ``(resamples, n)`` index draw."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))  # (R, n)
    means = x[idx].mean(1)  # (R,)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def paired_mean_test(a: Sequence[float], b: Sequence[float], *, resamples: int = 5000,
                     seed: int = 0) -> dict[str, float]:
    """Paired test of ``mean(a) - mean(b)`` over the same questions (KL of two methods).

    ``delta``: the mean difference; ``interval``: its 95 % percentile bootstrap interval
    (:func:`bootstrap_mean` of the differences); ``p``: two-sided sign-flip permutation p-value
    under "the differences are symmetric about 0" (``resamples`` random flips from ``seed``, plus
    the observed one, so p is never 0); ``se``: the paired standard error of ``delta``."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired_mean_test: the two methods have {len(a)} and {len(b)} values; pair the same questions")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # (n,)
    n = d.size
    if n == 0:
        return {"delta": 0.0, "se": 0.0, "p": 1.0, "interval": [math.nan, math.nan]}
    observed = abs(d.mean())
    signs = np.where(np.random.default_rng(seed).random((resamples, n)) < 0.5, -1.0, 1.0)  # (R, n)
    flipped = np.abs(signs @ d) / n  # (R,)
    p = (1 + int((flipped >= observed - 1e-15).sum())) / (resamples + 1)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return {"delta": float(d.mean()), "se": se, "p": p, "interval": list(bootstrap_mean(d, seed=seed))}


def detectable(se: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true paired difference a two-sided test at ``alpha`` detects with ``power``,
    given the paired standard error ``se`` of the observed difference (the normal approximation:
    ``(z_{1 - alpha/2} + z_power) * se``)."""
    from statistics import NormalDist

    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se
