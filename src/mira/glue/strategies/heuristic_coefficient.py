"""Heuristic (Coefficient): add members best-first with the best interpolation coefficient.

For each next member ``theta_new`` the merge ``c * theta + (1 - c) * theta_new`` is scored
for ``c`` in 0.1, 0.2, ..., 0.9, and the **best** ``c`` is kept (the reference code keeps
the last one tried, which is a bug) -- provided it does not score below the current merge;
otherwise the member is skipped.
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

COEFFICIENTS = tuple(round(0.1 * i, 1) for i in range(1, 10))


@register_strategy
class HeuristicCoefficient(Strategy):
    name = "heuristic_coefficient"

    def select(self, member_scores: Sequence[float], sim: Sequence[Sequence[float]], score: ScoreFn,
               options: StrategyOptions) -> Selection:
        k = len(member_scores)
        order = by_score(member_scores)
        weights = one_hot(k, order[0])
        best = score(weights)
        trace: list[dict] = [{"member": order[0], "score": best, "kept": True}]
        for i in order[1:]:
            new = one_hot(k, i)
            tried = [(c, [c * w + (1 - c) * n for w, n in zip(weights, new)]) for c in COEFFICIENTS]
            scored = [(score(w), c, w) for c, w in tried]
            s, c, w = max(scored, key=lambda t: t[0])  # the best c, first on ties
            keep = s >= best
            trace.append({"member": i, "c": c, "score": s, "kept": keep,
                          "grid": {str(cc): ss for ss, cc, _ in scored}})
            if keep:
                weights, best = w, s
        return Selection(weights, best, trace)
