"""``fedyogi`` (Reddi et al. 2021): Yogi on the server.

``m <- beta1 m + (1-beta1) Delta``; ``v <- v - (1-beta2) Delta^2 sign(v - Delta^2)``;
``x <- x + server_lr * m / (sqrt(v) + tau)`` with ``Delta = mean - x`` (no bias correction,
as the paper and Flower). Defaults are Flower's FedYogi: ``server_lr`` 0.01, ``beta1`` 0.9,
``beta2`` 0.99, ``tau`` 1e-3. Untuned here.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from mira.federated.strategies.base import register_strategy
from mira.federated.strategies.fedopt import FedOpt


class FedYogiParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


@register_strategy
class FedYogi(FedOpt):
    name = "fedyogi"
    Params = FedYogiParams

    def step(self, key, delta):
        m = self.first_moment(key, delta)
        sq = delta * delta
        v = self.v.get(key, torch.zeros_like(delta))
        self.v[key] = v - (1 - float(self.p.beta2)) * sq * torch.sign(v - sq)
        return m / (self.v[key].sqrt() + self.p.tau)
