"""``fedavgm`` (Hsu et al. 2019; the FedOpt family's SGD-with-momentum server, Reddi et al. 2021).

``v <- momentum * v + Delta``, ``x <- x + server_lr * v`` with ``Delta = mean - x``
(Flower's FedAvgM with ``g = -Delta``: ``v <- momentum * v + g``, ``x <- x - server_lr * v``).
Defaults: ``server_lr`` 1.0 (Flower's); ``momentum`` 0.9 (Hsu et al. and Reddi et al.'s
FedAvgM; Flower's default 0.0 with ``server_lr`` 1 is plain FedAvg). Untuned here.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from mira.federated.strategies.base import register_strategy
from mira.federated.strategies.fedopt import FedOpt


class FedAvgMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


@register_strategy
class FedAvgM(FedOpt):
    name = "fedavgm"
    Params = FedAvgMParams

    def step(self, key, delta):
        v = self.m.get(key, torch.zeros_like(delta))
        self.m[key] = float(self.p.momentum) * v + delta
        return self.m[key]
