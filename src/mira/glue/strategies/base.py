"""Selective merging inside a cluster: the strategy interface and the registry by name.

A strategy decides how to merge the ``k`` members of one cluster. It sees the merge only
through ``score(weights)``: the validation score (higher is better) of the merge with
those non-negative per-member weights (normalised by the merger; a zero weight leaves the
member out). It also gets each member's own score and the cluster's similarity matrix,
and returns the weights it keeps. Scores are memoised, so a strategy may ask twice.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from mira.errors import MiraError

ScoreFn = Callable[[Sequence[float]], float]


@dataclass
class Selection:
    """The outcome of a strategy: per-member weights, their score and what was tried."""

    weights: list[float]
    score: float
    trace: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    """What the search did (e.g. CMA-ES: budget, evaluations, population size, generations)."""

    @property
    def kept(self) -> list[int]:
        return [i for i, w in enumerate(self.weights) if w > 0]


MergeSimilarity = Callable[[Sequence[float], int], float]
"""``(weights, i) -> similarity`` of the merge with ``weights`` to member ``i`` (attention/MLP weights)."""


@dataclass
class StrategyOptions:
    budget: int = 40
    sigma: float = 0.3
    seed: int = 0
    merge_similarity: MergeSimilarity | None = None
    """Heuristic-Similarity re-ranks against the current merge with this; without it, the
    similarity of a merge is approximated by the weighted mean of its members' similarities."""


class Strategy(ABC):
    """One way to choose merge weights inside a cluster."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, member_scores: Sequence[float], sim: Sequence[Sequence[float]], score: ScoreFn,
               options: StrategyOptions) -> Selection:
        """Return the weights to merge the cluster with."""


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise MiraError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}", where="strategy.name")
    return STRATEGIES[name]()


def strategy_names() -> list[str]:
    return sorted(STRATEGIES)


def one_hot(k: int, i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(k)]


def by_score(member_scores: Sequence[float]) -> list[int]:
    """Member indices, best validation score first (ties: zoo order)."""
    return sorted(range(len(member_scores)), key=lambda i: (-member_scores[i], i))


def memoised(score: ScoreFn) -> ScoreFn:
    """``score`` with results cached by the rounded weights."""
    cache: dict[tuple, float] = {}

    def wrapped(weights: Sequence[float]) -> float:
        key = tuple(round(float(w), 6) for w in weights)
        if key not in cache:
            cache[key] = float(score(list(weights)))
        return cache[key]

    return wrapped
