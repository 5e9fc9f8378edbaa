"""The reliability report: split-half rank correlation, standard errors, the noise verdict and its suggestion."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mira.shed import ShedSettings, refine
from mira.shed.reliability import assess, spearman, spearman_brown
from mira.shed.shapley import monte_carlo_shapley


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 2], [2, 1]))
    assert spearman_brown(0.5) == pytest.approx(2 / 3)


def signal_game(n=20, noise=0.0, seed=0):
    """Additive worth per player plus, optionally, fresh noise on every v(S) (a noisy fine-tune)."""
    w = np.linspace(-1, 1, n)
    rng = np.random.default_rng(seed)

    def v(s):
        return float(sum(w[i] for i in s)) + (noise * rng.normal() if noise else 0.0)

    return v


def test_values_with_signal_are_declared_reliable():
    res = monte_carlo_shapley(20, signal_game(noise=0.05), iterations=8, group_size=1, seed=0, antithetic=True,
                              center=True)
    rel = assess(res, threshold=0.5, noise_values=[1.0, 1.01, 0.99])
    assert rel.reliable and rel.split_half > 0.8 and rel.full > rel.split_half
    assert "carry signal" in rel.verdict and rel.suggested_iterations is None
    assert rel.noise_sd == pytest.approx(0.01) and rel.value_spread > rel.mean_stderr
    text = "\n".join(rel.lines())
    assert "split-half rank correlation" in text and "noise of one v(S) 0.01" in text


def test_pure_noise_is_called_noise_with_a_budget_suggestion():
    def noise_only(s, rng=np.random.default_rng(3)):
        return float(rng.normal())

    res = monte_carlo_shapley(20, noise_only, iterations=8, group_size=2, seed=0, antithetic=True, center=True)
    rel = assess(res, threshold=0.5, seconds_per_evaluation=2.0)
    assert not rel.reliable and rel.split_half < 0.5
    assert "NOISE" in rel.verdict and "no better than random sampling" in rel.verdict
    if rel.split_half > 0.05:  # a positive correlation projects a number of iterations, with its cost
        assert rel.suggested_iterations > 8 and f"--iterations {rel.suggested_iterations}" in rel.verdict
        assert rel.suggested_seconds == pytest.approx(rel.suggested_evaluations * 2.0)
    else:
        assert "More iterations alone" in rel.verdict


def test_suggestion_follows_spearman_brown():
    """A split-half r on 8 iterations: reaching 0.5 takes (0.5 (1 - r)) / (r 0.5) times the iterations."""
    res = monte_carlo_shapley(10, signal_game(10), iterations=8, group_size=1, seed=0, antithetic=True)
    assert assess(res, threshold=0.5).reliable  # an exact additive game
    weak = np.array([5, 0, 9, 1, 7, 2, 4, 8, 3, 6.0])  # a weakly increasing order (Spearman 0.18)
    res.split_half = lambda: (np.arange(10.0), weak)
    rel = assess(res, threshold=0.5, seconds_per_evaluation=1.0)
    r = spearman(np.arange(10.0), weak)
    assert rel.split_half == pytest.approx(r) and 0.05 < r < 0.5 and not rel.reliable
    expected = math.ceil(8 * (0.5 * (1 - r)) / (r * 0.5))
    assert rel.suggested_iterations == expected + expected % 2
    assert rel.suggested_evaluations == rel.suggested_iterations * (10 - 1)  # the last group completes N


def test_not_measurable_cases():
    one = monte_carlo_shapley(10, signal_game(10), iterations=2, group_size=1, seed=0, antithetic=True)
    rel = assess(one)
    assert rel.split_half is None and not rel.reliable and "NOT MEASURED" in rel.verdict
    tiny = monte_carlo_shapley(2, signal_game(2), iterations=4, group_size=1, seed=0)
    assert "not measurable with 2 clusters" in assess(tiny).verdict


def test_refine_reports_reliability_in_the_result_and_shed_json(records, tmp_path):
    import json

    from mira.shed import write_outputs

    from .conftest import TaskValue

    s = ShedSettings(embedder="hashing", clusters=12, iterations=6, group_size=2, budget_fraction=0.25)
    res = refine(records, s, value_factory=lambda proxies, val: TaskValue(proxies))
    rel = res.reliability
    assert rel is not None and rel.iterations == 6 and rel.units == 3
    assert rel.noise_sd is None  # a value function without ``evaluate`` cannot be re-seeded
    rep = json.loads(write_outputs(res, tmp_path / "r.jsonl", plot=False)["report"].read_text())
    assert rep["reliability"]["split_half"] == pytest.approx(rel.split_half)
    assert {"evaluations", "cache_hits", "verdict", "mean_stderr", "value_spread"} <= set(rep["reliability"])
    assert rep["wall_s"] == pytest.approx(res.timings["total_s"])


def test_a_few_bad_players_are_a_filter_even_when_the_ranking_is_noise():
    """Six bad players, eighteen equally good ones: the order among the good is noise (low split-half), but the
    bad are the lowest quarter in both halves, and the verdict says so."""
    worth = np.array([-1.0] * 6 + [0.0] * 18)
    rng = np.random.default_rng(5)

    def v(s):
        return float(sum(worth[i] for i in s)) + 0.3 * rng.normal()

    res = monte_carlo_shapley(24, v, iterations=8, group_size=1, seed=0, antithetic=True, center=True)
    rel = assess(res, threshold=0.9)
    assert rel.bottom_size == 6 and rel.bottom_overlap >= 5 and rel.bottom_p < 0.01
    if not rel.reliable:
        assert "lowest quarter is consistent" in rel.verdict and "not random" in rel.verdict
    assert "lowest quarter:" in "\n".join(rel.lines())


def test_hypergeometric_tail():
    from mira.shed.reliability import hypergeom_tail

    assert hypergeom_tail(24, 6, 0) == pytest.approx(1.0)
    # P(two random 6-subsets of 24 share all 6) = 1 / C(24, 6)
    assert hypergeom_tail(24, 6, 6) == pytest.approx(1 / math.comb(24, 6))
