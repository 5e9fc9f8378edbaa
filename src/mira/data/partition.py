"""Split records into federated clients, each with its own train/test split (seeded).

With ``partition.val_fraction > 0`` each client's *training* examples are split once more:
``round(val_fraction * n_train)`` of them (at least 1) become its validation split, drawn
with a generator of their own (``SeedSequence([seed, 1, client])``), so the test split is
the same with or without a validation split, and train, validation and test are disjoint.

Partitioners are classes registered by name in ``PARTITIONERS``:
``by_task`` (each client holds one task, ``clients_per_task`` clients per task: MIRA's
setting), ``dirichlet`` (task mixture per client drawn from Dir(alpha): FedIT's setting)
and ``iid``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from mira.data.records import Record
from mira.errors import MiraError


@dataclass
class ClientData:
    id: int
    task: str
    train: list[Record]
    test: list[Record]
    val: list[Record] = field(default_factory=list)  # carved from the training data (partition.val_fraction)


PARTITIONERS: dict[str, type["Partitioner"]] = {}


def register_partitioner(cls):
    PARTITIONERS[cls.name] = cls
    return cls


class Partitioner:
    name: ClassVar[str]

    def __init__(self, cfg):
        self.cfg = cfg

    def groups(self, records: list[Record], rng: np.random.Generator) -> list[list[Record]]:
        raise NotImplementedError


def _by_task(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.task, []).append(r)
    return dict(sorted(out.items()))


@register_partitioner
class ByTask(Partitioner):
    name = "by_task"

    def groups(self, records, rng):
        out = []
        for task, group in _by_task(records).items():
            order = rng.permutation(len(group))
            for part in np.array_split(order, self.cfg.clients_per_task):
                out.append([group[i] for i in part])
        return out


@register_partitioner
class Dirichlet(Partitioner):
    name = "dirichlet"

    def groups(self, records, rng):
        k = self.cfg.num_clients
        if not k:
            raise MiraError("partition.num_clients is required for the dirichlet partitioner", where="partition.num_clients")
        out: list[list[Record]] = [[] for _ in range(k)]
        for task, group in _by_task(records).items():
            order = rng.permutation(len(group))
            props = rng.dirichlet([self.cfg.alpha] * k)
            cuts = (np.cumsum(props) * len(group)).astype(int)[:-1]
            for client, part in enumerate(np.split(order, cuts)):
                out[client] += [group[i] for i in part]
        return out


@register_partitioner
class IID(Partitioner):
    name = "iid"

    def groups(self, records, rng):
        k = self.cfg.num_clients
        if not k:
            raise MiraError("partition.num_clients is required for the iid partitioner", where="partition.num_clients")
        order = rng.permutation(len(records))
        return [[records[i] for i in part] for part in np.array_split(order, k)]


def partition(records: list[Record], cfg, seed: int, min_train: int = 1) -> list[ClientData]:
    """Partition ``records`` and give each client a train/test split."""
    if cfg.name not in PARTITIONERS:
        raise MiraError(f"unknown partitioner {cfg.name!r}; choose one of {sorted(PARTITIONERS)}", where="partition.name")
    rng = np.random.default_rng(seed)
    clients = []
    for cid, group in enumerate(PARTITIONERS[cfg.name](cfg).groups(records, rng)):
        group = [group[i] for i in rng.permutation(len(group))]
        n_test = cfg.test_size if cfg.test_size else int(round(len(group) * cfg.test_fraction))
        n_test = max(1, min(n_test, len(group) - 1)) if len(group) > 1 else 0
        train, test = group[n_test:], group[:n_test]
        task = Counter(r.task for r in group).most_common(1)[0][0] if group else "empty"
        if len(train) < min_train or not test:
            raise MiraError(
                f"client {cid} (task {task!r}) has {len(train)} training and {len(test)} test examples; "
                f"need at least {min_train} and 1 (add data, lower partition.num_clients or federation.batch_size)",
                where="partition")
        val: list[Record] = []
        frac = getattr(cfg, "val_fraction", 0.0) or 0.0
        if frac > 0:
            n_val = max(1, int(round(len(train) * frac)))
            if len(train) - n_val < min_train:
                raise MiraError(f"client {cid} (task {task!r}) has {len(train)} training examples, too few to carve a "
                                f"validation split of {n_val} and keep {min_train} for training",
                                where="partition.val_fraction")
            pick = set(np.random.default_rng(np.random.SeedSequence([seed, 1, cid])).permutation(len(train))[:n_val]
                       .tolist())
            val = [r for i, r in enumerate(train) if i in pick]
            train = [r for i, r in enumerate(train) if i not in pick]
        clients.append(ClientData(cid, task, train, test, val))
    return clients
