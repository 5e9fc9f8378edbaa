"""``oneshot`` (Wang et al., "One Communication Round is All It Needs"): every client
trains from the same initial adapter for the whole budget (T rounds x R steps) and
uploads once; the server merges once.

The merge is a linear average weighted by client data size by default, or any
``mira.merge`` method by option (``merge: ties``, with ``merge_params``). Every method gets
the clients' data-size proportions ``n_i / sum_j n_j`` as weights (summing to 1), never the
raw counts: for the methods that sum task vectors (``task_arithmetic``, ``dare``, ``ties``
with ``normalize: false``) the server update ``sum_i w_i (theta_i - theta_init)`` is then a
weighted average of the clients' updates, not a sum scaled by the number of examples
(``task_arithmetic`` gives exactly the linear average). Clients may arrive in any order:
results are merged in client-id order, so the merged adapter does not depend on arrival
order.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mira.errors import MiraError
from mira.federated.strategies.base import FitIns, FitRes, data_size_weights, register_strategy, weighted_average
from mira.federated.strategies.fedit import FedIT


class OneShotParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge: str = "linear"
    merge_params: dict[str, Any] = Field(default_factory=dict)


@register_strategy
class OneShot(FedIT):
    name = "oneshot"
    rounds_extendable = False  # its local steps are scaled by federation.rounds
    uniform_steps = False  # one round of T x R steps
    dp_central = False  # its merge weighs individual uploads
    Params = OneShotParams

    @classmethod
    def parse_params(cls, raw: dict) -> OneShotParams:
        """Also checks the merge method and its parameters now, at config validation, not at aggregation."""
        p = super().parse_params(raw)
        if p.merge == "linear" and not p.merge_params:
            return p
        from mira.merge.registry import method_names
        from mira.merge.state import merge_params

        if p.merge != "linear" and p.merge not in method_names():
            raise MiraError(f"unknown merge method {p.merge!r}; choose linear or one of {method_names()}",
                            where=f"algorithm.merge ({cls.name})")
        if p.merge == "linear" and p.merge_params:
            raise MiraError("merge_params apply to a mira.merge method (merge: ties, dare, ...); "
                            "the default linear average takes none", where=f"algorithm.merge_params ({cls.name})")
        try:
            method, mp = merge_params(p.merge, p.merge_params, 2)
            method.validate([1.0, 1.0], mp)  # what does not depend on the clients' sizes
        except MiraError as e:
            msg = str(e)[len(e.where) + 2:] if e.where else str(e)
            raise MiraError(msg, where=f"algorithm.merge_params ({cls.name})") from None
        return p

    def num_rounds(self, rounds: int) -> int:
        return 1

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.init, step_scale=self.ctx.rounds)

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if not results:
            return {}
        ordered = [results[cid] for cid in sorted(results)]
        keys = self.wire_keys()
        weights = data_size_weights([r.n_train for r in ordered])
        if self.p.merge == "linear":
            merged = weighted_average([r.adapter for r in ordered], weights, keys)
        else:
            from mira.merge import merge_state_dicts

            merged = merge_state_dicts(self.p.merge, [r.adapter for r in ordered], weights,
                                       base=self.init, params=self.p.merge_params)
        self.global_adapter = {**self.global_adapter, **merged}
        return {"merged_clients": sorted(results)}
