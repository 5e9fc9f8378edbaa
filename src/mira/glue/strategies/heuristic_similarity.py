"""Heuristic (Similarity), as Model-GLUE defines it: re-rank the candidates against the current merge.

The merge starts with the best-scoring member. At every step each remaining candidate's
weight similarity to the *current merge* is computed (mean per-column cosine over the
attention and MLP matrices, ``mira.glue.similarity``), the most similar candidate is tried
with the interpolation coefficient searched as Heuristic (Coefficient) does,
``c * theta_merge + (1 - c) * theta_new`` for ``c`` in 0.1..0.9, and it is kept (with the
best ``c``) only if the merged score does not drop. A candidate tried once is not tried
again, so the search costs ``1 + 9 (k - 1)`` evaluations for ``k`` members.
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
from mira.glue.strategies.heuristic_coefficient import COEFFICIENTS


def _approx_similarity(sim: Sequence[Sequence[float]]):
    def merge_similarity(weights: Sequence[float], i: int) -> float:
        total = sum(weights)
        return sum(w * sim[j][i] for j, w in enumerate(weights) if w > 0) / total
    return merge_similarity


@register_strategy
class HeuristicSimilarity(Strategy):
    name = "heuristic_similarity"

    def select(self, member_scores: Sequence[float], sim: Sequence[Sequence[float]], score: ScoreFn,
               options: StrategyOptions) -> Selection:
        k = len(member_scores)
        merge_similarity = options.merge_similarity or _approx_similarity(sim)
        rank = {i: r for r, i in enumerate(by_score(member_scores))}
        first = by_score(member_scores)[0]
        weights = one_hot(k, first)
        best = score(weights)
        trace: list[dict] = [{"member": first, "score": best, "kept": True}]
        remaining = [i for i in range(k) if i != first]
        while remaining:
            sims = {i: float(merge_similarity(weights, i)) for i in remaining}
            i = max(remaining, key=lambda j: (sims[j], -rank[j]))  # most similar; ties: the better member
            remaining.remove(i)
            new = one_hot(k, i)
            scored = [(score(w), c, w) for c, w in
                      ((c, [c * a + (1 - c) * b for a, b in zip(weights, new)]) for c in COEFFICIENTS)]
            s, c, w = max(scored, key=lambda t: t[0])
            keep = s >= best
            trace.append({"member": i, "similarity_to_merge": round(sims[i], 6),
                          "candidates": {str(j): round(v, 6) for j, v in sims.items()},
                          "c": c, "score": s, "kept": keep, "grid": {str(cc): ss for ss, cc, _ in scored}})
            if keep:
                weights, best = w, s
        return Selection(weights, best, trace)
