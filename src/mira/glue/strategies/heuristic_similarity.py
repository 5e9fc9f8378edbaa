"""Heuristic (Similarity): like Heuristic (Average), but candidates come in order of similarity.

The merge starts with the best-scoring member; the others are tried in decreasing order
of their weight similarity to it, each kept only if the uniform average does not score
worse.
"""
from __future__ import annotations

from collections.abc import Sequence

from mira.glue.strategies.base import (
    ScoreFn,
    Selection,
    Strategy,
    StrategyOptions,
    by_score,
    register_strategy,
)
from mira.glue.strategies.heuristic_average import greedy_average


@register_strategy
class HeuristicSimilarity(Strategy):
    name = "heuristic_similarity"

    def select(self, member_scores: Sequence[float], sim: Sequence[Sequence[float]], score: ScoreFn,
               options: StrategyOptions) -> Selection:
        first = by_score(member_scores)[0]
        rest = sorted((i for i in range(len(member_scores)) if i != first), key=lambda i: (-sim[first][i], i))
        return greedy_average([first, *rest], len(member_scores), score)
