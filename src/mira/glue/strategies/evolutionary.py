"""Evolutionary merge: CMA-ES (the ``cma`` library) over the members' merge weights.

The search vector is one weight per member; negative entries are clipped to 0 (left out)
and the merger normalises the rest. It starts from the uniform average and the best
member's score is the bar to beat: the best weights ever scored (including the best single
member) are returned, so the search never ends worse than its starting points.

``budget`` counts validation evaluations, the best member's included; the population is
``popsize_for(k)`` (8 for 4 or more members), so the default budget of 40 runs 4 complete
generations for 4+ members (``1 + 4 * 8 = 33`` evaluations, the remaining 7 a partial one).
The generations actually run are reported in ``Selection.info`` (``glue.json``: ``clusters[i].search``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from mira.glue.strategies.base import (
    ScoreFn,
    Selection,
    Strategy,
    StrategyOptions,
    by_score,
    one_hot,
    register_strategy,
)


def popsize_for(dim: int) -> int:
    """CMA-ES population size used here for ``dim`` weights: ``4 + 3 ln(dim)``, clipped to 4..8."""
    return max(4, min(8, 4 + int(3 * math.log(max(2, dim)))))


def cma_minimise(objective: Callable[[np.ndarray], float], x0: Sequence[float], sigma0: float, budget: int,
                 seed: int = 0, stats: dict | None = None) -> tuple[np.ndarray, float, list[float]]:
    """Minimise ``objective`` with CMA-ES within ``budget`` evaluations.

    Returns the best point seen, its value and the best-so-far value after each evaluation.
    A 1-D problem is searched as 2-D (CMA-ES needs two) with the second coordinate ignored.
    ``stats`` (if given) receives ``popsize``, ``generations`` (complete ones, each told to
    CMA-ES) and ``evaluations``.
    """
    import cma

    x0 = np.asarray(x0, dtype=float)
    pad = x0.size == 1
    start = np.append(x0, 0.0) if pad else x0
    opts = {"maxfevals": int(budget), "seed": int(seed) + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0,
            "popsize": popsize_for(start.size)}
    es = cma.CMAEvolutionStrategy(start.tolist(), float(sigma0), opts)
    best_x, best_f, history = x0.copy(), math.inf, []
    used = generations = 0
    while not es.stop() and used < budget:
        xs = es.ask()
        xs = xs[: budget - used]
        fs = []
        for x in xs:
            point = np.asarray(x[:1] if pad else x)
            f = float(objective(point))
            fs.append(f)
            used += 1
            if f < best_f:
                best_x, best_f = point.copy(), f
            history.append(best_f)
        if len(fs) < es.popsize:
            break  # budget ran out mid-generation
        es.tell(xs, fs)
        generations += 1
    if stats is not None:
        stats.update(popsize=int(es.popsize), generations=generations, evaluations=used)
    return best_x, best_f, history


@register_strategy
class Evolutionary(Strategy):
    name = "evolutionary"

    def select(self, member_scores: Sequence[float], sim: Sequence[Sequence[float]], score: ScoreFn,
               options: StrategyOptions) -> Selection:
        k = len(member_scores)
        best_member = by_score(member_scores)[0]
        start = one_hot(k, best_member)
        candidates = [(score(start), start)]
        trace: list[dict] = []

        def weights_of(x: np.ndarray) -> list[float]:
            w = np.clip(x, 0.0, None)
            return (w / w.sum()).tolist() if w.sum() > 0 else [1.0 / k] * k

        def objective(x: np.ndarray) -> float:
            w = weights_of(x)
            s = score(w)
            candidates.append((s, w))
            trace.append({"weights": [round(v, 4) for v in w], "score": s})
            return -s

        budget = max(2, options.budget - 1)
        stats: dict = {}
        cma_minimise(objective, [1.0 / k] * k, options.sigma, budget, options.seed, stats)
        s, w = max(candidates, key=lambda t: t[0])
        info = {"budget": options.budget, **stats, "evaluations": stats.get("evaluations", 0) + 1}
        return Selection(list(w), s, trace, info)
