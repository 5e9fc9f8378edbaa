"""Task graphs ``a_kl`` for MIRA's Laplacian step, one class per option, registered by name.

* ``random``: as in the MIRA paper: U ~ Uniform[0,1]^{KxK}, (U+U^T)/2, entries below
  0.25 set to 0, zero diagonal (seeded).
* ``uniform``: all ones off the diagonal.
* ``file``: a user's K x K matrix (``.npy``, ``.csv`` or ``.json``), validated: square,
  symmetric, non-negative, finite, zero diagonal.
* ``similarity`` (new in mira): re-estimated every round from the clients' own adapter
  updates: cosine similarity of the flattened updates, clipped at 0. A client that has
  not trained yet has no edges. Two options choose the estimate of client k's direction:

  - ``similarity: cosine`` (default): its latest update as it is;
    ``similarity: centered``: its latest update minus the mean update of the clients
    trained in the *same round* (the component that every client of that round shares, such
    as learning the prompt format or a drift of training that all follow; with partial
    participation the stored updates come from different rounds, and raw cosine then links
    clients sampled together rather than clients with the same task). A round with a single
    update has nothing to center against and leaves the estimates as they were.
    ``similarity: profile``: two clients are alike when they are alike *to the same others*.
    The clients' estimates are centred by their mean across clients (which removes the direction
    that every client's training shares, e.g. learning the prompt format); c_kl is the cosine of
    the centred estimates, and a_kl the Pearson correlation of c_k. and c_l. over the other
    clients (neither k nor l), clipped at 0. On Dolly's overlapping categories this separates the
    tasks where a raw cosine cannot (docs/mira.md, "Which estimator").
  - ``similarity_average: true``: the mean of its (centered) updates over all rounds it
    trained in, instead of the latest one (less noise; the default is ``false``).

``task_auc`` measures how well a graph separates the tasks: the ROC AUC of ``a_kl`` over
the client pairs ``k < l``, same-task pairs being the positives.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from mira.errors import MiraError

GRAPHS: dict[str, type["TaskGraph"]] = {}


def register_graph(cls):
    GRAPHS[cls.name] = cls
    return cls


def validate_graph(a: np.ndarray, k: int, where: str = "algorithm.graph") -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise MiraError(f"graph must be a square matrix, got shape {a.shape}", where=where)
    if a.shape[0] != k:
        raise MiraError(f"graph is {a.shape[0]}x{a.shape[0]} but there are {k} clients", where=where)
    if not np.isfinite(a).all():
        raise MiraError("graph has NaN or infinite entries", where=where)
    if (a < 0).any():
        i, j = np.argwhere(a < 0)[0]
        raise MiraError(f"graph entry [{i},{j}] = {a[i, j]} is negative", where=where)
    if not np.allclose(a, a.T):
        i, j = np.argwhere(~np.isclose(a, a.T))[0]
        raise MiraError(f"graph is not symmetric: [{i},{j}]={a[i, j]} but [{j},{i}]={a[j, i]}", where=where)
    if np.any(np.diag(a) != 0):
        raise MiraError("graph diagonal must be zero", where=where)
    return a


class TaskGraph:
    name: ClassVar[str]
    dynamic: ClassVar[bool] = False

    def __init__(self, k: int, seed: int, file: str | None = None, **options):
        self.k = k
        self.a = np.zeros((k, k))

    def max_degree_bound(self) -> float:
        """An upper bound of max_k sum_l a_kl over the whole run (for the overshoot check)."""
        return float(self.a.sum(axis=1).max()) if self.k else 0.0

    def update(self, updates: dict[int, torch.Tensor]) -> np.ndarray:
        return self.a


def task_auc(a: np.ndarray, tasks: list[str]) -> float | None:
    """ROC AUC with which ``a_kl`` (upper triangle) separates same-task pairs (positives) from
    different-task pairs; None unless both kinds of pair exist."""
    k = len(tasks)
    iu = np.triu_indices(k, 1)
    same = np.array([tasks[i] == tasks[j] for i, j in zip(*iu)], dtype=bool)
    if not same.any() or same.all():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(same, np.asarray(a, dtype=np.float64)[iu]))


@register_graph
class RandomGraph(TaskGraph):
    name = "random"

    def __init__(self, k, seed, file=None, **options):
        super().__init__(k, seed)
        u = np.random.default_rng(seed).uniform(0, 1, (k, k))
        a = (u + u.T) / 2
        a[a < 0.25] = 0
        np.fill_diagonal(a, 0)
        self.a = a


@register_graph
class UniformGraph(TaskGraph):
    name = "uniform"

    def __init__(self, k, seed, file=None, **options):
        super().__init__(k, seed)
        self.a = np.ones((k, k)) - np.eye(k)


@register_graph
class FileGraph(TaskGraph):
    name = "file"

    def __init__(self, k, seed, file=None, **options):
        super().__init__(k, seed)
        if not file:
            raise MiraError("graph 'file' needs algorithm.graph_file", where="algorithm.graph_file")
        p = Path(file)
        if not p.exists():
            raise MiraError(f"graph file not found: {file}", where="algorithm.graph_file")
        try:
            if p.suffix == ".npy":
                a = np.load(p)
            elif p.suffix == ".json":
                a = np.array(json.loads(p.read_text()), dtype=float)
            else:
                a = np.loadtxt(p, delimiter=",", ndmin=2)
        except (ValueError, json.JSONDecodeError) as e:
            raise MiraError(f"cannot read a matrix: {e}", where=str(p)) from e
        self.a = validate_graph(a, k, where=str(p))


SIMILARITIES = ("cosine", "centered", "profile")


def profile_similarity(c: np.ndarray) -> np.ndarray:
    """``similarity: profile``: for each pair k != l the Pearson correlation of rows c[k] and c[l]
    over the other columns (neither k nor l), clipped at 0; 0 where fewer than 2 others exist or
    a row is constant on them."""
    c = np.asarray(c, dtype=np.float64)
    n = len(c)
    out = np.zeros((n, n))
    for k in range(n):
        for j in range(k + 1, n):
            keep = np.ones(n, dtype=bool)
            keep[[k, j]] = False
            if keep.sum() < 2:
                continue
            a, b = c[k, keep] - c[k, keep].mean(), c[j, keep] - c[j, keep].mean()
            d = float(np.sqrt((a @ a) * (b @ b)))
            out[k, j] = out[j, k] = max(float(a @ b) / d, 0.0) if d > 1e-12 else 0.0
    return out


@register_graph
class SimilarityGraph(TaskGraph):
    name = "similarity"
    dynamic = True

    def __init__(self, k, seed, file=None, similarity: str = "cosine", similarity_average: bool = False, **options):
        super().__init__(k, seed)
        if similarity not in SIMILARITIES:
            raise MiraError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}",
                            where="algorithm.similarity")
        self.centered, self.average = similarity == "centered", bool(similarity_average)
        self.profile = similarity == "profile"
        self.last_update: dict[int, torch.Tensor] = {}  # the estimate of each client's direction
        self.sums: dict[int, torch.Tensor] = {}  # with similarity_average: sum of the estimates and their count
        self.counts: dict[int, int] = {}

    def max_degree_bound(self) -> float:
        return float(max(self.k - 1, 0))  # cosine <= 1 (MIRA checks each round's graph instead, see Mira)

    def update(self, updates: dict[int, torch.Tensor]) -> np.ndarray:
        if self.centered:
            if len(updates) < 2:
                updates = {}  # nothing to center against: the estimates stay as they were
            else:
                mean = torch.stack([u.double() for u in updates.values()]).mean(dim=0)
                updates = {cid: u.double() - mean for cid, u in updates.items()}
        for cid, u in updates.items():
            if self.average:
                self.sums[cid] = self.sums[cid] + u.double() if cid in self.sums else u.double().clone()
                self.counts[cid] = self.counts.get(cid, 0) + 1
                self.last_update[cid] = self.sums[cid] / self.counts[cid]
            else:
                self.last_update[cid] = u
        ids = sorted(self.last_update)
        if len(ids) >= 2:
            m = torch.stack([self.last_update[i] for i in ids]).double()
            if self.profile:
                m = m - m.mean(dim=0, keepdim=True)
            m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cos = (m @ m.T).numpy()
            sim = profile_similarity(cos) if self.profile else np.clip(cos, 0, None)
            np.fill_diagonal(sim, 0)
            a = np.zeros((self.k, self.k))
            a[np.ix_(ids, ids)] = sim
            self.a = a
        return self.a

    def state_dict(self) -> dict:
        return {"last_update": self.last_update, "a": self.a, "sums": self.sums, "counts": self.counts}

    def load_state_dict(self, s: dict) -> None:
        self.last_update, self.a = s["last_update"], s["a"]
        self.sums, self.counts = s.get("sums", {}), s.get("counts", {})


def build_graph(name: str, k: int, seed: int, file: str | None = None, **options) -> TaskGraph:
    if name not in GRAPHS:
        raise MiraError(f"unknown graph {name!r}; choose one of {sorted(GRAPHS)}", where="algorithm.graph")
    return GRAPHS[name](k, seed, file, **options)
