"""FedOpt (Reddi et al., ICLR 2021, "Adaptive Federated Optimization"): the server treats
the clients' average as a pseudo-gradient and steps a server optimiser on it.

Sign convention (the paper's): with ``x`` the global adapter and ``mean`` the FedAvg of the
uploads (weighted by training-set size, tensor by tensor as in ``fedit``), the
pseudo-gradient is ``Delta = mean - x`` (an *update*, the negative of a gradient) and every
algorithm does::

    x <- x + server_lr_t * step(Delta)

``fedavgm``: ``step = v``, ``v <- momentum * v + Delta`` (Flower's FedAvgM, PyTorch's SGD
momentum without dampening: Flower writes it with ``g = x - mean`` and ``x <- x - lr * v``).
``fedadam`` / ``fedyogi`` / ``fedadagrad``: ``m <- beta1 * m + (1 - beta1) * Delta``,
``step = m / (sqrt(v) + tau)``, with ``v`` Adam's, Yogi's or Adagrad's second moment (see
each class) of ``Delta`` itself (OpenFedLLM's fedadam/fedyogi square the momentum ``m``
instead). ``m`` and ``v`` start at 0 (as in Flower). Only FedAdam bias-corrects its step.

This base class is not registered; the algorithms subclass it. Each round with at least one
upload is one server step (``t``), so a round whose every update was rejected changes nothing.
The state (``global``, ``m``, ``v``, ``t``) is checkpointed, so a resumed run is exact.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from mira.federated.strategies.base import FitRes
from mira.federated.strategies.fedit import FedIT


class FedOpt(FedIT):
    """Server optimiser on the pseudo-gradient ``Delta = mean - x``; ``x <- x + lr_t * step(Delta)``."""

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        self.m: dict[str, Tensor] = {}  # first moment (fedavgm: the momentum buffer)
        self.v: dict[str, Tensor] = {}  # second moment
        self.t = 0  # server steps taken

    def server_lr(self) -> float:
        """The step size of server step ``self.t`` (1-based)."""
        return float(self.p.server_lr)

    def step(self, key: str, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def first_moment(self, key: str, delta: Tensor) -> Tensor:
        beta1 = float(self.p.beta1)
        m = self.m.get(key, torch.zeros_like(delta))
        self.m[key] = beta1 * m + (1 - beta1) * delta
        return self.m[key]

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if not results:
            return {}
        mean, info = self.average(results)
        self.t += 1
        lr = self.server_lr()
        new, sq = {}, 0.0
        for key, target in mean.items():
            x = self.global_adapter[key].to(target.device, target.dtype)
            delta = target - x
            sq += float(delta.double().pow(2).sum())
            new[key] = x + lr * self.step(key, delta)
        self.global_adapter = {**self.global_adapter, **new}
        return {**info, "pseudo_grad_norm": math.sqrt(sq), "server_lr": lr}

    def state_dict(self) -> dict:
        return {"global": dict(self.global_adapter), "m": dict(self.m), "v": dict(self.v), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.global_adapter, self.m, self.v = dict(state["global"]), dict(state["m"]), dict(state["v"])
        self.t = int(state["t"])
