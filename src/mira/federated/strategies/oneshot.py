"""``oneshot`` (Wang et al., "One Communication Round is All It Needs"): every client
trains from the same initial adapter for the whole budget (T rounds x R steps) and
uploads once; the server merges once.

The merge is a linear average weighted by client data size by default, or any
``mira.merge`` method by option (``merge: ties``, with ``merge_params``). Clients may
arrive in any order: results are merged in client-id order, so the merged adapter does
not depend on arrival order.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mira.federated.strategies.base import FitIns, FitRes, register_strategy, weighted_average
from mira.federated.strategies.fedit import FedIT


class OneShotParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge: str = "linear"
    merge_params: dict[str, Any] = Field(default_factory=dict)


@register_strategy
class OneShot(FedIT):
    name = "oneshot"
    Params = OneShotParams

    def num_rounds(self, rounds: int) -> int:
        return 1

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.init, step_scale=self.ctx.rounds)

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if not results:
            return {}
        ordered = [results[cid] for cid in sorted(results)]
        keys = self.wire_keys()
        if self.p.merge == "linear":
            merged = weighted_average([r.adapter for r in ordered], [r.n_train for r in ordered], keys)
        else:
            from mira.merge import merge_state_dicts

            merged = merge_state_dicts(self.p.merge, [r.adapter for r in ordered], [r.n_train for r in ordered],
                                       base=self.init, params=self.p.merge_params)
        self.global_adapter = {**self.global_adapter, **merged}
        return {"merged_clients": sorted(results)}
