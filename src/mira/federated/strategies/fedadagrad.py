"""``fedadagrad`` (Reddi et al. 2021): Adagrad on the server.

``m <- beta1 m + (1-beta1) Delta``; ``v <- v + Delta^2``;
``x <- x + server_lr * m / (sqrt(v) + tau)`` with ``Delta = mean - x``. Defaults are Flower's
FedAdagrad: ``server_lr`` 0.1, ``tau`` 1e-9 and ``beta1`` 0 (no momentum: ``m = Delta``).
Untuned here. (OpenFedLLM's client code lists the algorithm as ``fedadgrad``, a typo that
keeps its ``fedadagrad`` from matching; nothing of its code is used here.)
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from mira.federated.strategies.base import register_strategy
from mira.federated.strategies.fedopt import FedOpt


class FedAdagradParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(0.1, gt=0)
    beta1: float = Field(0.0, ge=0, lt=1)
    tau: float = Field(1e-9, gt=0)


@register_strategy
class FedAdagrad(FedOpt):
    name = "fedadagrad"
    Params = FedAdagradParams

    def step(self, key, delta):
        m = self.first_moment(key, delta)
        v = self.v.get(key, torch.zeros_like(delta))
        self.v[key] = v + delta * delta
        return m / (self.v[key].sqrt() + self.p.tau)
