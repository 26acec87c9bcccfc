"""How many random trials are enough? The exact best-of-N analysis of docs/experiments.md section 4.

From ONE pool of M finished random-search trials, the best score among N trials drawn from the
pool without replacement has an exact distribution: with the pool sorted ascending,
v(1) <= ... <= v(M), the maximum is v(i) with probability C(i-1, N-1) / C(M, N), for i >= N
(the other N-1 draws all come from the i-1 smaller values). Its expectation is therefore

    E[max of N] = sum over i >= N of v(i) * C(i-1, N-1) / C(M, N),

with no re-training. Ties need no special care: equal values at neighbouring ranks give the
same maximum whichever of them is drawn. N larger than the pool is refused: the pool says
nothing about more trials than it holds.

No MLflow or TensorFlow here; the search logs what these functions return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BestOfN:
    """The distribution of the best score among ``n`` trials drawn from a pool of ``pool_size``."""

    n: int
    pool_size: int
    expected: float
    standard_deviation: float
    # The 10th and 90th percentiles: the band a plot shows around the expectation.
    low: float
    high: float


def max_probabilities(pool_size: int, n: int) -> np.ndarray:
    """P(the maximum of ``n`` draws is the i-th smallest of ``pool_size`` values), i = 1..pool_size."""
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    if n > pool_size:
        raise ValueError(f"n={n} is more than the {pool_size} finished trials in the pool; the pool cannot say")
    total = math.comb(pool_size, n)
    # Exact integer counts, divided once, so large pools lose no precision to products of ratios.
    return np.array([math.comb(rank - 1, n - 1) / total for rank in range(1, pool_size + 1)], dtype=float)


def best_of_n(values: Sequence[float], n: int) -> BestOfN:
    """The exact expectation, standard deviation and 10-90% band of the best of ``n`` draws."""
    ordered = np.sort(np.asarray(values, dtype=float))
    if not np.all(np.isfinite(ordered)):
        raise ValueError("the pool holds a value that is not a finite number")
    probabilities = max_probabilities(len(ordered), n)
    expected = float(np.dot(probabilities, ordered))
    variance = float(np.dot(probabilities, (ordered - expected) ** 2))
    cumulative = np.cumsum(probabilities)
    low = float(ordered[min(np.searchsorted(cumulative, 0.1 - 1e-12), len(ordered) - 1)])
    high = float(ordered[min(np.searchsorted(cumulative, 0.9 - 1e-12), len(ordered) - 1)])
    return BestOfN(n, len(ordered), expected, math.sqrt(max(variance, 0.0)), low, high)


def best_of_n_table(values: Sequence[float], ns: Sequence[int] = (1, 5, 10, 20, 50, 100)) -> list[BestOfN]:
    """``best_of_n`` for every N in ``ns`` that the pool can answer (N <= its size); never extrapolates."""
    return [best_of_n(values, n) for n in ns if n <= len(values)]
