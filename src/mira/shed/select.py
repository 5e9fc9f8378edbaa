"""Step 4 of SHED: pick records to a budget from clusters ranked by their proxy's value.

Strategies are classes registered by name in ``SELECTORS``:

* ``qocs`` (quality-ordered cluster sampling): whole clusters in decreasing order of
  value (ties: lower cluster id first) until the budget is met; the last cluster is
  trimmed to hit the budget exactly, keeping its members nearest the centroid.
* ``qwcs`` (quality-weighted cluster sampling): repeatedly draw a cluster with
  probability proportional to ``exp(beta * value)`` among clusters with records left,
  then one of its remaining records uniformly; no record is drawn twice.

Every strategy returns exactly ``count`` distinct point indices, deterministic in ``seed``.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from mira.shed.cluster import Clustering

SELECTORS: dict[str, type["Selector"]] = {}


def register_selector(cls):
    SELECTORS[cls.name] = cls
    return cls


class Selector:
    """``select(clustering, values, count, seed, beta) -> point indices`` (selection order)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def select(self, clustering: Clustering, values: np.ndarray, count: int, *, seed: int = 0,
               beta: float = 1.0) -> list[int]:
        raise NotImplementedError


def _check(clustering: Clustering, values: np.ndarray, count: int) -> None:
    if len(values) != clustering.k:
        raise ValueError(f"{len(values)} values for {clustering.k} clusters")
    total = int(clustering.sizes.sum())
    if not 0 < count <= total:
        raise ValueError(f"cannot select {count} of {total} records")


@register_selector
class QOCS(Selector):
    name = "qocs"
    description = "whole clusters by decreasing proxy value; the last one trimmed"

    def select(self, clustering, values, count, *, seed=0, beta=1.0):
        _check(clustering, values, count)
        order = sorted(range(clustering.k), key=lambda c: (-float(values[c]), c))
        out: list[int] = []
        for c in order:
            out += clustering.members[c][: count - len(out)].tolist()
            if len(out) == count:
                break
        return out


def softmax_weights(values: np.ndarray, beta: float) -> np.ndarray:
    """``exp(beta * v) / sum exp(beta * v)``, computed stably."""
    z = beta * np.asarray(values, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


@register_selector
class QWCS(Selector):
    name = "qwcs"
    description = "draw clusters with probability ~ exp(beta * value), one record at a time, no repeats"

    def select(self, clustering, values, count, *, seed=0, beta=1.0):
        _check(clustering, values, count)
        rng = np.random.default_rng([seed, 7])
        weights = softmax_weights(values, beta)
        left = [list(m) for m in clustering.members]
        alive = np.array([len(m) > 0 for m in left])
        out: list[int] = []
        while len(out) < count:
            p = np.where(alive, weights, 0.0)
            if p.sum() <= 0:  # every remaining cluster underflowed to weight 0: fall back to uniform
                p = alive.astype(np.float64)
            c = int(rng.choice(len(p), p=p / p.sum()))
            out.append(int(left[c].pop(int(rng.integers(len(left[c]))))))
            alive[c] = bool(left[c])
        return out


def select(name: str, clustering: Clustering, values: np.ndarray, count: int, *, seed: int = 0,
           beta: float = 1.0) -> list[int]:
    """Run the strategy ``name`` (a key of ``SELECTORS``)."""
    return SELECTORS[name]().select(clustering, values, count, seed=seed, beta=beta)
