"""``fedprox`` (Li et al. 2020): FedIT plus ``mu/2 * ||theta - theta_global||^2`` in the local loss."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mira.federated.strategies.base import FitIns, register_strategy
from mira.federated.strategies.fedit import FedIT


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.01, ge=0)


@register_strategy
class FedProx(FedIT):
    name = "fedprox"
    Params = FedProxParams

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.global_adapter, prox_mu=self.p.mu)
