"""Step 3 of SHED: Monte-Carlo Shapley values by permutation removal of groups.

For ``n`` players (the cluster proxies) and a value function ``v`` on coalitions
(frozensets of player ids), each of ``iterations`` rounds:

1. draws a seeded random permutation of the players;
2. starts from the full set ``N`` and removes ``group_size`` players at a time, in
   permutation order, until the set is empty;
3. credits the removed group with ``v(before) - v(after)``: with ``credit="group"``
   each member receives the whole marginal (as in the paper's reference code), with
   ``credit="split"`` each receives ``marginal / len(group)`` (so a round's credits add
   up to ``v(N) - v(empty)``);
4. *truncation*: once ``|v(current) - v(empty)| < tolerance * |v(N) - v(empty)|`` the
   remaining marginals are negligible; the rest of the round is credited 0 without
   evaluating ``v``.

A player's value is the mean of its credits over the rounds. With ``group_size=1``
this is the classic permutation estimator of the Shapley value (exact for additive
games). ``v`` is evaluated through ``CachedValue``, keyed by the frozenset, so ``v(N)``
is computed once and repeated coalitions are free.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import numpy as np

ValueFn = Callable[[frozenset], float]
ProgressFn = Callable[[int, int], None]
"""``progress(advance, total)``: ``advance`` more group steps done out of ``total``."""


class CachedValue:
    """Memoise ``v(S)`` by the frozenset ``S``; counts evaluations and cache hits."""

    def __init__(self, fn: ValueFn):
        self.fn = fn
        self.cache: dict[frozenset, float] = {}
        self.evaluations = 0
        self.hits = 0
        self.seconds = 0.0

    def __call__(self, coalition: frozenset) -> float:
        key = frozenset(coalition)
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        t0 = time.perf_counter()
        value = float(self.fn(key))
        self.seconds += time.perf_counter() - t0
        self.evaluations += 1
        self.cache[key] = value
        return value


@dataclass
class ShapleyResult:
    """Per-player estimates and the bookkeeping of how they were obtained."""

    values: np.ndarray  # (n,) mean credit
    credits: np.ndarray  # (iterations, n)
    v_empty: float
    v_full: float
    evaluations: int  # distinct v(S) computed (cache misses), including v(empty) and v(N)
    cache_hits: int
    truncated_groups: int  # group steps credited 0 without evaluating v
    total_groups: int
    seconds: float
    iteration_log: list[dict] = field(default_factory=list)

    @property
    def stderr(self) -> np.ndarray:
        """Standard error of each mean (0 with a single iteration)."""
        k = len(self.credits)
        return self.credits.std(axis=0, ddof=1) / np.sqrt(k) if k > 1 else np.zeros(self.credits.shape[1])


def monte_carlo_shapley(n_players: int, value: ValueFn, *, iterations: int = 10, group_size: int = 60,
                        seed: int = 0, tolerance: float = 0.0, credit: Literal["group", "split"] = "group",
                        progress: Optional[ProgressFn] = None) -> ShapleyResult:
    """Estimate Shapley values of ``n_players`` players under ``value`` (see the module docstring)."""
    if n_players < 1:
        raise ValueError("need at least one player")
    if iterations < 1 or group_size < 1:
        raise ValueError("iterations and group_size must be positive")
    if credit not in ("group", "split"):
        raise ValueError(f"unknown credit rule {credit!r}")
    t0 = time.perf_counter()
    v = value if isinstance(value, CachedValue) else CachedValue(value)
    everyone = frozenset(range(n_players))
    v_empty = v(frozenset())
    v_full = v(everyone)
    scale = abs(v_full - v_empty)
    n_groups = -(-n_players // group_size)
    total = iterations * n_groups
    credits = np.zeros((iterations, n_players), dtype=np.float64)
    truncated = 0
    log: list[dict] = []
    for it in range(iterations):
        perm = np.random.default_rng([seed, it]).permutation(n_players)
        current, v_cur = everyone, v_full
        done = 0
        evals_before = v.evaluations
        for start in range(0, n_players, group_size):
            if tolerance > 0 and abs(v_cur - v_empty) <= tolerance * scale:
                break
            group = perm[start:start + group_size]
            remaining = current.difference(group.tolist())
            v_next = v(remaining) if remaining else v_empty
            marginal = v_cur - v_next
            credits[it, group] = marginal if credit == "group" else marginal / len(group)
            current, v_cur = remaining, v_next
            done += 1
            if progress:
                progress(1, total)
        skipped = n_groups - done
        truncated += skipped
        if progress and skipped:
            progress(skipped, total)
        log.append({"iteration": it, "groups_evaluated": done, "groups_truncated": skipped,
                    "new_evaluations": v.evaluations - evals_before})
    return ShapleyResult(values=credits.mean(axis=0), credits=credits, v_empty=v_empty, v_full=v_full,
                         evaluations=v.evaluations, cache_hits=v.hits, truncated_groups=truncated, total_groups=total,
                         seconds=time.perf_counter() - t0, iteration_log=log)
