"""Monte-Carlo permutation-removal Shapley: exactness on known games, cache, truncation, determinism."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mira.shed.shapley import CachedValue, monte_carlo_shapley


def additive(weights):
    return lambda s: float(sum(weights[i] for i in s))


def exact_shapley(n: int, v) -> np.ndarray:
    """Exact Shapley values by enumerating all permutations (small n only)."""
    phi = np.zeros(n)
    for perm in itertools.permutations(range(n)):
        s: set[int] = set()
        for p in perm:
            before = v(frozenset(s))
            s.add(p)
            phi[p] += v(frozenset(s)) - before
    return phi / math.factorial(n)


@pytest.mark.parametrize("credit", ["group", "split"])
def test_additive_game_recovered_exactly(credit):
    w = np.random.default_rng(0).normal(size=17)
    res = monte_carlo_shapley(17, additive(w), iterations=4, group_size=1, seed=3, credit=credit)
    np.testing.assert_allclose(res.values, w, atol=1e-12)
    np.testing.assert_allclose(res.credits, np.tile(w, (4, 1)), atol=1e-12)  # every permutation is exact
    assert res.v_empty == 0.0 and res.v_full == pytest.approx(w.sum())


def test_matches_exact_shapley_on_a_non_additive_game():
    w = np.array([1.0, 2.0, 0.5, -1.0, 3.0])

    def v(s):  # diminishing returns plus an interaction between players 0 and 4
        base = sum(w[i] for i in s)
        return math.sqrt(abs(base)) * np.sign(base) + (2.0 if {0, 4} <= s else 0.0)

    exact = exact_shapley(5, v)
    est = monte_carlo_shapley(5, v, iterations=3000, group_size=1, seed=0)
    np.testing.assert_allclose(est.values, exact, atol=0.05)
    assert est.evaluations <= 2 ** 5  # the cache makes repeated coalitions free


@pytest.mark.parametrize("antithetic, center", [(True, False), (False, True), (True, True)])
def test_variance_reduction_keeps_the_exact_shapley_value(antithetic, center):
    """Antithetic pairs and the position control variate are unbiased: they converge to the exact values."""
    w = np.array([1.0, 2.0, 0.5, -1.0, 3.0])

    def v(s):
        base = sum(w[i] for i in s)
        return math.sqrt(abs(base)) * np.sign(base) + (2.0 if {0, 4} <= s else 0.0)

    exact = exact_shapley(5, v)
    est = monte_carlo_shapley(5, v, iterations=3000, group_size=1, seed=0, antithetic=antithetic, center=center)
    np.testing.assert_allclose(est.values, exact, atol=0.05)
    assert est.values.sum() == pytest.approx(exact.sum(), abs=0.05)  # centring keeps the sum


def saturating(signal):
    """A game like v(S) with a fixed training budget: the first records added are worth most, whoever they
    are (sqrt of the size), plus a small additive worth per player; exact values by symmetry + additivity."""
    n = len(signal)

    def v(s):
        return math.sqrt(len(s)) + float(sum(signal[i] for i in s))

    exact = math.sqrt(n) / n + np.asarray(signal)  # the size term is symmetric: sqrt(n)/n each
    return v, exact


def test_centering_and_antithetic_pairs_reduce_the_error_on_a_saturating_game():
    signal = np.random.default_rng(0).normal(scale=0.05, size=40)
    v, exact = saturating(signal)
    errors = {}
    for name, kw in {"plain": {}, "reduced": {"antithetic": True, "center": True}}.items():
        errs = [np.sqrt(np.mean((monte_carlo_shapley(40, v, iterations=10, group_size=1, seed=s, **kw).values
                                 - exact) ** 2)) for s in range(6)]
        errors[name] = float(np.mean(errs))
    assert errors["reduced"] < 0.5 * errors["plain"], errors


def test_units_stderr_and_split_half():
    v, _ = saturating(np.linspace(-0.2, 0.2, 12))
    res = monte_carlo_shapley(12, v, iterations=8, group_size=3, seed=1, antithetic=True, center=True)
    assert res.units.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and res.n_units == 4
    # an antithetic partner adds the same groups in the reverse order
    assert np.array_equal(res.positions[1], res.positions[0].max() - res.positions[0])
    a, b = res.split_half()
    np.testing.assert_allclose(a, res.estimate([0, 2]))
    np.testing.assert_allclose(b, res.estimate([1, 3]))
    assert res.stderr.shape == (12,) and np.all(res.stderr >= 0)
    single = monte_carlo_shapley(12, v, iterations=2, group_size=3, seed=1, antithetic=True)
    assert single.split_half() is None and np.all(single.stderr == 0)


def test_split_credit_is_efficient_per_iteration_with_groups():
    w = np.random.default_rng(1).normal(size=23)
    v = lambda s: float(np.tanh(sum(w[i] for i in s)))  # noqa: E731 - not additive
    res = monte_carlo_shapley(23, v, iterations=5, group_size=4, seed=0, credit="split")
    np.testing.assert_allclose(res.credits.sum(axis=1), res.v_full - res.v_empty, atol=1e-12)


def test_group_credit_gives_each_member_the_group_marginal():
    w = np.arange(6, dtype=float)
    res = monte_carlo_shapley(6, additive(w), iterations=1, group_size=3, seed=0, credit="group")
    perm = np.random.default_rng([0, 0]).permutation(6)
    for group in (perm[:3], perm[3:]):
        assert np.all(res.credits[0, group] == w[group].sum())


def test_cache_counts_each_coalition_once():
    calls = []

    def v(s):
        calls.append(s)
        return float(len(s))

    res = monte_carlo_shapley(4, v, iterations=20, group_size=2, seed=0)
    # v(empty) and v(N) once; per iteration one lookup of a 2-set (the empty set at the end is known)
    assert len(calls) == len(set(calls)) == res.evaluations
    distinct_pairs = res.evaluations - 2
    assert 1 <= distinct_pairs <= 6
    assert res.cache_hits == 20 - distinct_pairs > 0
    assert res.total_groups == 40


def test_truncation_credits_the_rest_zero_and_skips_evaluations():
    # only player 0 matters: once it is removed, v(current) == v(empty) and the iteration stops
    v = lambda s: 1.0 if 0 in s else 0.0  # noqa: E731
    full = monte_carlo_shapley(20, v, iterations=8, group_size=1, seed=0, tolerance=0.0)
    trunc = monte_carlo_shapley(20, v, iterations=8, group_size=1, seed=0, tolerance=0.01)
    np.testing.assert_allclose(trunc.values, full.values)
    assert trunc.values[0] == 1.0 and np.all(trunc.values[1:] == 0)
    assert trunc.truncated_groups > 0 and full.truncated_groups == 0
    assert trunc.evaluations < full.evaluations


def test_truncation_when_v_full_equals_v_empty_keeps_the_values():
    """``v(N) = v(empty)`` makes the tolerance 0: no truncation (a ``<=`` test made every value 0 here)."""
    w = np.array([1.0, -2.0, 0.5, 0.5])

    def v(s):
        return 0.0 if len(s) == 4 else float(sum(w[i] for i in s))

    exact = exact_shapley(4, v)
    assert np.abs(exact).max() > 0.1
    est = monte_carlo_shapley(4, v, iterations=2000, group_size=1, seed=0, tolerance=0.05)
    assert est.truncated_groups == 0
    np.testing.assert_allclose(est.values, exact, atol=0.05)


def test_truncation_fires_on_the_tolerance_in_addition_order():
    # v saturates once 3 players are in: the rest of a permutation adds < 1% and is credited 0 unevaluated
    v = lambda s: min(len(s), 3) / 3 + 0.001 * len(s)  # noqa: E731
    res = monte_carlo_shapley(30, v, iterations=4, group_size=1, seed=0, tolerance=0.1)
    assert res.truncated_groups >= 4 * 20
    assert res.evaluations <= 2 + 4 * 10


def test_same_seed_same_estimate_and_progress_reaches_total():
    v = lambda s: float(np.sin(sum(s)))  # noqa: E731
    seen = []
    a = monte_carlo_shapley(12, v, iterations=3, group_size=2, seed=5, tolerance=0.2,
                            progress=lambda adv, tot: seen.append((adv, tot)))
    b = monte_carlo_shapley(12, v, iterations=3, group_size=2, seed=5, tolerance=0.2)
    c = monte_carlo_shapley(12, v, iterations=3, group_size=2, seed=6, tolerance=0.2)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)
    assert sum(adv for adv, _ in seen) == a.total_groups == 18


def test_cached_value_wraps_once():
    cv = CachedValue(lambda s: float(len(s)))
    assert cv(frozenset({1, 2})) == 2.0 and cv(frozenset({2, 1})) == 2.0
    assert (cv.evaluations, cv.hits) == (1, 1)


def test_per_unit_value_functions_average_the_luck_of_a_seed():
    """``unit_value``: each unit (antithetic pair) plays its own game, e.g. v trained with its own seed. A player that
    one seed never draws is worth 0 under that seed; with one fixed seed it is 0 in every round, with a seed per
    unit its value is the average over the units (the Shapley value of the expected game)."""
    w = np.array([1.0, 2.0, -1.0, 0.5, 3.0, -2.0])

    def game(unit):  # seed ``unit`` misses player unit % 6 (its worth is not seen under that seed)
        return lambda s: float(sum(w[i] for i in s if i != unit % 6))

    fixed = monte_carlo_shapley(6, game(0), iterations=12, group_size=1, seed=1, antithetic=True)
    assert fixed.values[0] == 0.0  # seed 0 never sees player 0: no permutation can fix that
    per = monte_carlo_shapley(6, game(0), iterations=12, group_size=1, seed=1, antithetic=True, unit_value=game)
    np.testing.assert_allclose(per.values, w * 5 / 6, atol=1e-12)  # 6 units, each misses one player
    assert per.v_empty == 0.0 and per.v_full == pytest.approx(w[1:].sum())  # reported: ``value``'s own
    # evaluations count every unit's games (v(empty) and v(N) of each included)
    assert per.evaluations > fixed.evaluations
    same = monte_carlo_shapley(6, game(0), iterations=12, group_size=2, seed=4, antithetic=True, center=True,
                               unit_value=lambda u: game(0))
    ref = monte_carlo_shapley(6, game(0), iterations=12, group_size=2, seed=4, antithetic=True, center=True)
    np.testing.assert_allclose(same.values, ref.values, atol=1e-12)  # the same game in every unit: unchanged
