"""``fedit`` (FedIT, Zhang et al. 2024): FedAvg of the LoRA A and B tensors.

Every sampled client starts from the global adapter; the server replaces it with the
average of the uploaded adapters weighted by the clients' training-set sizes.
"""
from __future__ import annotations

from mira.federated.strategies.base import FitIns, FitRes, Strategy, register_strategy, weighted_average


@register_strategy
class FedIT(Strategy):
    name = "fedit"

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        self.global_adapter = dict(self.init)

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.global_adapter)

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if results:
            keys = self.wire_keys()
            merged = weighted_average([r.adapter for r in results.values()], [r.n_train for r in results.values()], keys)
            self.global_adapter = {**self.global_adapter, **merged}
        return {}

    def adapter_for(self, cid: int):
        return self.global_adapter

    def state_dict(self) -> dict:
        return {"global": self.global_adapter}

    def load_state_dict(self, state: dict) -> None:
        self.global_adapter = state["global"]
