"""``centralized``: one adapter trained on the pooled data of all clients (a reference,
not federated). Each round it takes as many steps as all sampled clients together, so
the total number of steps equals the federated runs'."""
from __future__ import annotations

from mira.federated.strategies.base import FitRes, NoParams, register_strategy
from mira.federated.strategies.fedit import FedIT


@register_strategy
class Centralized(FedIT):
    name = "centralized"
    dp_central = False  # no client uploads
    Params = NoParams
    exchanges = False
    pooled = True

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        (res,) = results.values()
        self.global_adapter = res.adapter
        return {}
