"""Selective-merging strategies against fake score functions (no model involved)."""
from __future__ import annotations

import numpy as np
import pytest

from mira.errors import MiraError
from mira.glue.strategies import StrategyOptions, get_strategy, memoised, strategy_names
from mira.glue.strategies.evolutionary import cma_minimise

SIM3 = [[1.0, 0.2, 0.9], [0.2, 1.0, 0.1], [0.9, 0.1, 1.0]]


def test_registry():
    assert {"heuristic_average", "heuristic_coefficient", "heuristic_similarity", "evolutionary"} <= set(strategy_names())
    with pytest.raises(MiraError):
        get_strategy("nope")


def test_coefficient_keeps_best_c_not_last():
    # member 0 is the better one; merge weights are c * e0 + (1 - c) * e1. The score peaks at c = 0.3.
    calls = []

    def score(w):
        calls.append(list(w))
        return -abs(w[0] - 0.3)

    sel = get_strategy("heuristic_coefficient").select([-0.5, -1.0], [[1, 0.9], [0.9, 1]], memoised(score),
                                                       StrategyOptions())
    assert sel.weights == pytest.approx([0.3, 0.7])
    assert sel.trace[1]["c"] == 0.3 and sel.trace[1]["kept"]
    assert calls[-1] == pytest.approx([0.9, 0.1])  # the last c tried was 0.9, and it was not kept


def test_coefficient_skips_member_that_only_hurts():
    # any share of member 1 makes things worse
    sel = get_strategy("heuristic_coefficient").select([0.0, -1.0], [[1, 0.9], [0.9, 1]],
                                                       memoised(lambda w: -w[1]), StrategyOptions())
    assert sel.weights == [1.0, 0.0] and not sel.trace[1]["kept"]


def test_average_skips_harmful_model():
    # members 0 and 2 help each other; member 1 is harmful in any average
    def score(w):
        kept = {i for i, x in enumerate(w) if x > 0}
        return (1.0 if kept >= {0, 2} else 0.0) - (5.0 if 1 in kept else 0.0)

    # member order by own score: 0, 1, 2
    sel = get_strategy("heuristic_average").select([0.0, -0.1, -0.2], SIM3, memoised(score), StrategyOptions())
    assert sel.kept == [0, 2]
    assert [t["member"] for t in sel.trace] == [0, 1, 2]
    assert [t["kept"] for t in sel.trace] == [True, False, True]


def test_similarity_orders_by_similarity_to_best():
    seen = []

    def score(w):
        seen.append(tuple(i for i, x in enumerate(w) if x > 0))
        return 0.0

    # member 1 scores best; member 2 is less similar to it (0.1) than member 0 (0.2)
    sel = get_strategy("heuristic_similarity").select([-0.5, 0.0, -0.1], SIM3, memoised(score), StrategyOptions())
    assert [t["member"] for t in sel.trace] == [1, 0, 2]


def test_cma_improves_synthetic_objective():
    target = np.array([0.6, -0.3, 0.2, 0.9])

    def f(x):
        return float(((x - target) ** 2).sum())

    _x, fx, history = cma_minimise(f, [0.0] * 4, 0.3, budget=60, seed=0)
    assert len(history) <= 60
    assert fx < 0.1 * f(np.zeros(4))
    assert history == sorted(history, reverse=True)  # best-so-far never gets worse


def test_evolutionary_finds_better_weights_and_never_loses():
    best_w = np.array([0.2, 0.5, 0.3])

    def score(w):
        return -float(((np.asarray(w) - best_w) ** 2).sum())

    scores = [score([1, 0, 0]), score([0, 1, 0]), score([0, 0, 1])]
    sel = get_strategy("evolutionary").select(scores, SIM3, memoised(score), StrategyOptions(budget=40, seed=1))
    assert sel.score > max(scores)
    assert sel.score >= -0.05
    assert abs(sum(sel.weights) - 1.0) < 1e-6


def test_similarity_reranks_against_the_current_merge_and_searches_c():
    """Model-GLUE's Heuristic-Similarity: the next candidate is the one most similar to the merge so far."""
    # member 0 is best; by similarity to member 0 alone the order would be 1, 3, 2
    sim = [[1.0, 0.9, 0.1, 0.5], [0.9, 1.0, 0.95, 0.0], [0.1, 0.95, 1.0, 0.0], [0.5, 0.0, 0.0, 1.0]]
    calls = []

    def merge_similarity(weights, i):
        calls.append((tuple(weights), i))
        return sum(w * sim[j][i] for j, w in enumerate(weights)) / sum(weights)

    def score(w):  # prefers a 0.7 / 0.3 split between 0 and 1, then anything with 2
        return -abs(w[0] - 0.7) - abs(w[1] - 0.3) + 0.01 * w[2]

    sel = get_strategy("heuristic_similarity").select(
        [0.0, -0.5, -0.6, -0.4], sim, memoised(score), StrategyOptions(merge_similarity=merge_similarity))
    order = [t["member"] for t in sel.trace]
    assert order[:2] == [0, 1]
    w01 = sel.trace[1]
    assert w01["c"] == 0.7 and w01["kept"]  # the coefficient is searched, the best one kept
    merged = [0.7, 0.3, 0.0, 0.0]
    want_next = max((2, 3), key=lambda i: merge_similarity(merged, i))
    assert order[2] == want_next
    assert all(len(t["grid"]) == 9 for t in sel.trace[1:])
    # the similarities were asked of the merge, not of member 0 only
    assert any(w[1] > 0 for w, _ in calls)


def test_similarity_order_changes_with_the_merge():
    """A candidate that resembles the merge (not the best member) is tried first."""
    sim = [[1.0, 0.9, 0.1, 0.5], [0.9, 1.0, 0.99, 0.0], [0.1, 0.99, 1.0, 0.0], [0.5, 0.0, 0.0, 1.0]]

    def merge_similarity(weights, i):  # member 1 dominates the merge once it is in
        return sim[1][i] if weights[1] > 0 else sim[0][i]

    sel = get_strategy("heuristic_similarity").select(
        [0.0, -0.5, -0.6, -0.4], sim, memoised(lambda w: 0.0), StrategyOptions(merge_similarity=merge_similarity))
    assert [t["member"] for t in sel.trace] == [0, 1, 2, 3]  # by similarity to member 0 alone: 0, 1, 3, 2


def test_evolutionary_default_budget_runs_more_than_two_generations():
    k = 8
    best_w = np.linspace(1, 2, k) / np.linspace(1, 2, k).sum()

    def score(w):
        return -float(((np.asarray(w) - best_w) ** 2).sum())

    scores = [score(np.eye(k)[i]) for i in range(k)]
    sel = get_strategy("evolutionary").select(scores, [[1.0] * k] * k, memoised(score), StrategyOptions())
    assert sel.info["budget"] == 40 and sel.info["popsize"] == 8
    assert sel.info["generations"] >= 3 and sel.info["evaluations"] <= 40
