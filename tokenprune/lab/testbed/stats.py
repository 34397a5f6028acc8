"""Uncertainty for testbed accuracies: Wilson intervals and exact McNemar tests.

Every accuracy the testbed reports is a share of ``n`` independent questions, so it carries a
Wilson score interval (good at small ``n`` and near 0 or 1, where the normal approximation is not).
Two methods answer the *same* questions, so they are compared by a paired test: McNemar's, on the
questions where exactly one of them is right, computed exactly from the binomial distribution (no
continuity correction, no large-count approximation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["Z95", "wilson", "mcnemar", "paired_se"]

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
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = len(a)
    return {"a_only": a_only, "b_only": b_only, "delta": (a_only - b_only) / n if n else 0.0,
            "se": paired_se(a_only, b_only, n), "p": _binom_two_sided(a_only, a_only + b_only)}


def paired_se(a_only: int, b_only: int, n: int) -> float:
    """Standard error of a paired accuracy difference from its discordant counts."""
    if n == 0:
        return 0.0
    p10, p01 = a_only / n, b_only / n
    return math.sqrt(max(0.0, p10 + p01 - (p10 - p01) ** 2) / n)
