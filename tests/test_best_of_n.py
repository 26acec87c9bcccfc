"""The exact best-of-N analysis against brute-force enumeration of every draw."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mnist_mlflow.studies.best_of_n import best_of_n, best_of_n_table, max_probabilities


def brute_force_maxima(values, n):
    """The maximum of every possible draw of ``n`` distinct trials (all equally likely)."""
    return np.array([max(draw) for draw in itertools.combinations(values, n)], dtype=float)


POOLS = [
    [0.91, 0.95, 0.97, 0.93, 0.96, 0.92, 0.98],
    [0.9, 0.9, 0.95, 0.95, 0.95, 0.8],  # ties
    [0.5, 0.5, 0.5, 0.5],  # all equal
    [0.97],
]


@pytest.mark.parametrize("values", POOLS)
def test_expected_best_and_its_spread_equal_brute_force_for_every_n(values):
    for n in range(1, len(values) + 1):
        maxima = brute_force_maxima(values, n)
        result = best_of_n(values, n)
        assert result.expected == pytest.approx(maxima.mean(), abs=1e-12)
        assert result.standard_deviation == pytest.approx(maxima.std(), abs=1e-9)
        # The band: the 10th and 90th percentiles of the maxima (smallest value with at least
        # that share of draws at or below it).
        assert result.low == np.quantile(maxima, 0.1, method="inverted_cdf")
        assert result.high == np.quantile(maxima, 0.9, method="inverted_cdf")


def test_best_of_the_whole_pool_is_its_maximum_and_best_of_one_is_its_mean():
    values = POOLS[0]
    assert best_of_n(values, len(values)).expected == max(values)
    assert best_of_n(values, 1).expected == pytest.approx(np.mean(values))


def test_probabilities_sum_to_one_even_for_large_pools():
    for pool_size, n in ((5, 3), (200, 50), (1000, 100)):
        assert max_probabilities(pool_size, n).sum() == pytest.approx(1.0, abs=1e-9)


def test_n_larger_than_the_pool_or_below_one_is_refused():
    with pytest.raises(ValueError, match="more than the 3 finished trials"):
        best_of_n([0.9, 0.8, 0.7], 4)
    with pytest.raises(ValueError, match="at least 1"):
        best_of_n([0.9], 0)
    with pytest.raises(ValueError, match="finite"):
        best_of_n([0.9, float("nan")], 1)


def test_table_never_extrapolates_past_the_pool():
    values = list(np.linspace(0.9, 0.99, 12))
    assert [row.n for row in best_of_n_table(values)] == [1, 5, 10]
    expectations = [row.expected for row in best_of_n_table(values)]
    assert expectations == sorted(expectations)
