"""``fedadam`` (Reddi et al. 2021): Adam on the server.

``m <- beta1 m + (1-beta1) Delta``; ``v <- beta2 v + (1-beta2) Delta^2``;
``x <- x + lr_t * m / (sqrt(v) + tau)`` with ``Delta = mean - x`` and, with
``bias_correction`` (default, as Flower), ``lr_t = server_lr * sqrt(1 - beta2^t) / (1 - beta1^t)``
at server step ``t = 1, 2, ...`` (Kingma & Ba's; Flower's FedAdam uses ``t = round + 1``, one
step ahead). ``bias_correction: false`` is the paper's Algorithm 2 (``lr_t = server_lr``).
Defaults are Flower's: ``server_lr`` 0.1, ``beta1`` 0.9, ``beta2`` 0.99, ``tau`` 1e-9. Untuned here.
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from mira.federated.strategies.base import register_strategy
from mira.federated.strategies.fedopt import FedOpt


class FedAdamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(0.1, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-9, gt=0)
    bias_correction: bool = True


@register_strategy
class FedAdam(FedOpt):
    name = "fedadam"
    Params = FedAdamParams

    def server_lr(self) -> float:
        p = self.p
        if not p.bias_correction:
            return float(p.server_lr)
        return float(p.server_lr * math.sqrt(1 - p.beta2 ** self.t) / (1 - p.beta1 ** self.t))

    def step(self, key, delta):
        m = self.first_moment(key, delta)
        beta2 = float(self.p.beta2)
        v = self.v.get(key, torch.zeros_like(delta))
        self.v[key] = beta2 * v + (1 - beta2) * delta * delta
        return m / (self.v[key].sqrt() + self.p.tau)
