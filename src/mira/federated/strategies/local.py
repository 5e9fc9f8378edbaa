"""``local``: every client trains its own adapter alone; nothing is exchanged."""
from __future__ import annotations

from mira.federated.strategies.base import FitIns, FitRes, Strategy, register_strategy


@register_strategy
class Local(Strategy):
    name = "local"
    personalized = True
    exchanges = False

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        self.adapters = {cid: dict(self.init) for cid in range(ctx.num_clients)}

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.adapters[cid])

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        for cid, res in results.items():
            self.adapters[cid] = res.adapter
        return {}

    def adapter_for(self, cid: int):
        return self.adapters[cid]

    def state_dict(self) -> dict:
        return {"adapters": self.adapters}

    def load_state_dict(self, state: dict) -> None:
        self.adapters = state["adapters"]
