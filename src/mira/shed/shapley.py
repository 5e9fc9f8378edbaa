"""Step 3 of SHED: Monte-Carlo Shapley values over permutations of groups, with variance reduction.

For ``n`` players (the cluster proxies) and a value function ``v`` on coalitions
(frozensets of player ids), each of ``iterations`` rounds:

1. draws a seeded random permutation of the players and cuts it into groups of
   ``group_size`` (the paper removes 60 proxies at a time);
2. walks the groups from the empty set, adding one group at a time, and credits each group
   with ``v(after) - v(before)``: with ``credit="group"`` each member receives the whole
   marginal (as in the paper's reference code), with ``credit="split"`` each receives
   ``marginal / len(group)`` (so a round's credits add up to ``v(N) - v(empty)``). Adding
   groups in one order is removing them in the reverse order, so this is the paper's
   permutation-removal estimator; walking up from the empty set is what lets truncation
   skip the marginals that are known to be small;
3. *truncation*: once ``|v(N) - v(S)| < tolerance * |v(N) - v(empty)|`` the groups not yet added
   can change v by less than the tolerance in all; they are credited 0 without evaluating
   ``v``. The test is strict, so ``tolerance = 0`` (or ``v(N) = v(empty)``) never truncates.

Variance reduction (each optional, unbiased for the Shapley value):

* ``antithetic``: rounds come in pairs, one group order and its reverse, so a group that
  came first in one round comes last in the other. A *unit* (the independent draw) is then
  a pair of rounds;
* ``center``: a position control variate. With a fixed training budget per v(S), the group
  added first to the empty set gets a far larger marginal than the tenth, whoever is in
  it, and which players happened to come first dominates the plain estimate. Each
  credit is reduced by the mean credit at its position in the *other* rounds (leave one
  round out), then the overall mean credit is added back: the expectation (the Shapley
  value) is unchanged, the position lottery is removed. Values still sum to the plain
  estimate's sum.

A player's value is the mean of its credits. With ``group_size=1`` and no centring this is
the classic permutation estimator (exact for additive games). ``v`` is evaluated through
``CachedValue``, keyed by the frozenset, so v(N) and v(empty) are computed once and repeated
coalitions are free.

``ShapleyResult.estimate(units)`` recomputes the values from a subset of the units;
``split_half`` gives the estimates of two independent halves (used for reliability, see
``mira.shed.reliability``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

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

    @property
    def seconds_per_evaluation(self) -> float:
        return self.seconds / self.evaluations if self.evaluations else 0.0


def estimate_values(credits: np.ndarray, positions: np.ndarray, center: bool) -> np.ndarray:
    """Per-player values from ``credits`` and ``positions`` (both ``(rounds, n)``); see the module docstring."""
    per_round = centered_credits(credits, positions) if center else credits
    return per_round.mean(axis=0)


def centered_credits(credits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``credit - mean credit at the same position in the other rounds + overall mean credit``.

    With a single round there is nothing to compare against: the credits are returned unchanged."""
    k = len(credits)
    if k < 2:
        return credits.copy()
    m = int(positions.max()) + 1
    sums = np.zeros((k, m))
    counts = np.zeros((k, m))
    for r in range(k):
        np.add.at(sums[r], positions[r], credits[r])
        np.add.at(counts[r], positions[r], 1.0)
    tot_s, tot_c = sums.sum(axis=0), counts.sum(axis=0)
    other_c = tot_c[None, :] - counts
    with np.errstate(invalid="ignore", divide="ignore"):
        loo = np.where(other_c > 0, (tot_s[None, :] - sums) / np.maximum(other_c, 1), 0.0)  # (k, m)
    baseline = np.take_along_axis(loo, positions, axis=1)
    return credits - baseline + baseline.mean()


@dataclass
class ShapleyResult:
    """Per-player estimates and the bookkeeping of how they were obtained."""

    values: np.ndarray  # (n,) estimate (position-centred when ``centered``)
    credits: np.ndarray  # (rounds, n) raw credits
    positions: np.ndarray  # (rounds, n) position of each player's group in the round (0 = added first)
    units: np.ndarray  # (rounds,) independent draw of each round (antithetic pairs share one)
    v_empty: float
    v_full: float
    evaluations: int  # distinct v(S) computed (cache misses), including v(empty) and v(N)
    cache_hits: int  # lookups answered by the cache during the permutations
    truncated_groups: int  # group steps credited 0 without evaluating v
    total_groups: int
    seconds: float
    centered: bool = False
    antithetic: bool = False
    tolerance: float = 0.0  # the relative truncation tolerance used
    iteration_log: list[dict] = field(default_factory=list)

    @property
    def n_units(self) -> int:
        return len(np.unique(self.units))

    def estimate(self, units: Optional[Sequence[int]] = None) -> np.ndarray:
        """The values from the rounds of ``units`` only (all rounds when None)."""
        if units is None:
            return self.values
        rows = np.isin(self.units, np.asarray(list(units)))
        return estimate_values(self.credits[rows], self.positions[rows], self.centered)

    def split_half(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Estimates from two disjoint halves of the units (even / odd), or None with fewer than 2 units."""
        u = np.unique(self.units)
        if len(u) < 2:
            return None
        return self.estimate(u[0::2]), self.estimate(u[1::2])

    @property
    def stderr(self) -> np.ndarray:
        """Standard error of each value, from the spread of its per-unit means (0 with a single unit)."""
        per_round = centered_credits(self.credits, self.positions) if self.centered else self.credits
        u = np.unique(self.units)
        if len(u) < 2:
            return np.zeros(self.credits.shape[1])
        means = np.stack([per_round[self.units == x].mean(axis=0) for x in u])
        return means.std(axis=0, ddof=1) / np.sqrt(len(u))


def group_orders(n_players: int, group_size: int, iterations: int, seed: int,
                 antithetic: bool) -> list[list[np.ndarray]]:
    """Per round, the groups in the order they are added (seeded; antithetic rounds reverse their partner's order)."""
    out = []
    for it in range(iterations):
        unit = it // 2 if antithetic else it
        perm = np.random.default_rng([seed, unit]).permutation(n_players)
        groups = [perm[s:s + group_size] for s in range(0, n_players, group_size)]
        out.append(groups[::-1] if antithetic and it % 2 else groups)
    return out


def monte_carlo_shapley(n_players: int, value: ValueFn, *, iterations: int = 10, group_size: int = 60,
                        seed: int = 0, tolerance: float = 0.0, credit: Literal["group", "split"] = "group",
                        antithetic: bool = False, center: bool = False,
                        progress: Optional[ProgressFn] = None,
                        unit_value: Optional[Callable[[int], ValueFn]] = None) -> ShapleyResult:
    """Estimate Shapley values of ``n_players`` players under ``value`` (see the module docstring).

    ``unit_value(unit)``, when given, is the value function of the rounds of one unit (a permutation, or an
    antithetic pair): e.g. ``v`` trained with that unit's own training seed. Within a round every marginal
    is then paired (both coalitions under the same seed), while luck that a seed deals a player (batch
    priorities that never draw it) averages out over the units instead of being the same in every round.
    ``value`` still gives the reported ``v_empty`` / ``v_full``; each unit's truncation uses its own."""
    if n_players < 1:
        raise ValueError("need at least one player")
    if iterations < 1 or group_size < 1:
        raise ValueError("iterations and group_size must be positive")
    if credit not in ("group", "split"):
        raise ValueError(f"unknown credit rule {credit!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    t0 = time.perf_counter()
    v = value if isinstance(value, CachedValue) else CachedValue(value)
    everyone = frozenset(range(n_players))
    v_empty = v(frozenset())
    v_full = v(everyone)
    hits_before = v.hits  # count the hits of the permutations, not of these two lookups
    threshold = tolerance * abs(v_full - v_empty)  # 0 when v(N) = v(empty): never truncate then
    orders = group_orders(n_players, group_size, iterations, seed, antithetic)
    n_groups = len(orders[0])
    total = iterations * n_groups
    credits = np.zeros((iterations, n_players), dtype=np.float64)
    positions = np.zeros((iterations, n_players), dtype=np.int64)
    units = np.array([it // 2 if antithetic else it for it in range(iterations)], dtype=np.int64)
    truncated = 0
    log: list[dict] = []
    unit_fns: dict[int, tuple[CachedValue, float, float]] = {}
    for it, groups in enumerate(orders):
        vu, ve, vf = v, v_empty, v_full
        if unit_value is not None:
            unit = int(units[it])
            if unit not in unit_fns:
                fn = unit_value(unit)
                fn = fn if isinstance(fn, CachedValue) else CachedValue(fn)
                unit_fns[unit] = (fn, fn(frozenset()), fn(everyone))
            vu, ve, vf = unit_fns[unit]
        current, v_cur = frozenset(), ve
        done = 0
        evals_before = vu.evaluations
        for j, group in enumerate(groups):
            positions[it, group] = j
        for group in groups:
            if abs(vf - v_cur) < threshold:
                break
            bigger = current.union(group.tolist())
            v_next = vf if len(bigger) == n_players else vu(bigger)
            marginal = v_next - v_cur
            credits[it, group] = marginal if credit == "group" else marginal / len(group)
            current, v_cur = bigger, v_next
            done += 1
            if progress:
                progress(1, total)
        skipped = n_groups - done
        truncated += skipped
        if progress and skipped:
            progress(skipped, total)
        log.append({"iteration": it, "groups_evaluated": done, "groups_truncated": skipped,
                    "new_evaluations": vu.evaluations - evals_before})
    values = estimate_values(credits, positions, center)
    evaluations = v.evaluations + sum(fn.evaluations for fn, _, _ in unit_fns.values())
    hits = v.hits - hits_before + sum(fn.hits for fn, _, _ in unit_fns.values())
    return ShapleyResult(values=values, credits=credits, positions=positions, units=units, v_empty=v_empty,
                         v_full=v_full, evaluations=evaluations, cache_hits=hits,
                         truncated_groups=truncated,
                         total_groups=total, seconds=time.perf_counter() - t0, centered=center,
                         antithetic=antithetic, tolerance=tolerance, iteration_log=log)
