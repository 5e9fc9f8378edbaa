"""``fedit`` (FedIT, Zhang et al. 2024): FedAvg of the LoRA A and B tensors.

Every sampled client starts from the global adapter; the server replaces it with the
average of the uploaded adapters weighted by the clients' training-set sizes.

``aggregation: fedavg`` (default) averages ``A`` and ``B`` tensor by tensor, so the new
layer delta ``mean(B) @ mean(A)`` is not the average of the clients' deltas ``B_k @ A_k``;
the relative error is reported every round (``fedavg_error_mean`` / ``_max`` over modules,
in ``rounds.json``). ``aggregation: exact`` averages the products ``sum_k w_k B_k A_k`` and
re-factors them to rank r by truncated SVD (``sqrt(S)`` on each side; see
``strategies/products.py``), reporting the truncation error (``svd_error_mean`` / ``_max``)
and, for reference, the error FedAvg would have made on the same uploads.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from mira.federated.strategies.base import (FitIns, FitRes, Strategy, data_size_weights, register_strategy,
                                           weighted_average)
from mira.federated.strategies.products import exact_average, fedavg_error, lora_pairs


class FedITParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    aggregation: Literal["fedavg", "exact"] = "fedavg"


@register_strategy
class FedIT(Strategy):
    name = "fedit"
    Params = FedITParams
    dp_central = True  # also fedprox, ffa_lora and the FedOpt family, which inherit it

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        self.global_adapter = dict(self.init)

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.global_adapter)

    def average(self, results: dict[int, FitRes]) -> tuple[dict, dict]:
        """The server's average of the uploads (wire keys only) and what to log about it."""
        keys = self.wire_keys()
        states, sizes = [r.adapter for r in results.values()], [r.n_train for r in results.values()]
        weights = data_size_weights(sizes)
        modules = lora_pairs(keys)
        info = fedavg_error(states, weights, modules)
        if getattr(self.p, "aggregation", "fedavg") == "exact":
            merged, svd = exact_average(states, weights, modules)
            covered = set(merged)
            rest = [k for k in keys if k not in covered]  # non-LoRA-factor keys, if any: averaged as is
            if rest:
                merged.update(weighted_average(states, sizes, rest))
            return merged, {**info, **svd}
        return weighted_average(states, sizes, keys), info

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if not results:
            return {}
        merged, info = self.average(results)
        self.global_adapter = {**self.global_adapter, **merged}
        return info

    def adapter_for(self, cid: int):
        return self.global_adapter

    def state_dict(self) -> dict:
        return {"global": self.global_adapter}

    def load_state_dict(self, state: dict) -> None:
        self.global_adapter = state["global"]
