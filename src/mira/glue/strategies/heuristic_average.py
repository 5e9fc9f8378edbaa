"""Heuristic (Average): add members best-first; keep one only if the average does not get worse.

Members are sorted by their own validation score. The merge starts with the best one; each
next member is tried in the uniform average of the kept ones plus itself and is kept only
if the merged score does not drop below the current one.
"""
from __future__ import annotations

from collections.abc import Sequence

from mira.glue.strategies.base import (
    ScoreFn,
    Selection,
    Strategy,
    StrategyOptions,
    by_score,
    one_hot,
    register_strategy,
)


def greedy_average(order: Sequence[int], k: int, score: ScoreFn) -> Selection:
    """Uniform-average greedy selection over members in ``order`` (shared with Heuristic-Similarity)."""
    kept = [order[0]]
    weights = one_hot(k, order[0])
    best = score(weights)
    trace = [{"member": order[0], "score": best, "kept": True}]
    for i in order[1:]:
        trial = [1.0 if j in kept or j == i else 0.0 for j in range(k)]
        s = score(trial)
        keep = s >= best
        trace.append({"member": i, "score": s, "kept": keep})
        if keep:
            kept.append(i)
            weights, best = trial, s
    return Selection(weights, best, trace)


@register_strategy
class HeuristicAverage(Strategy):
    name = "heuristic_average"

    def select(self, member_scores: Sequence[float], sim: Sequence[Sequence[float]], score: ScoreFn,
               options: StrategyOptions) -> Selection:
        return greedy_average(by_score(member_scores), len(member_scores), score)
