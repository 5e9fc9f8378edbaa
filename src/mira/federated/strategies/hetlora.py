"""``hetlora`` (after Cho et al., EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models"): zero-padding aggregation up, truncation down.

The server keeps one global adapter ``G`` of the largest rank ``r_max``. Client j (rank ``r_j``) trains
from the truncation of ``G`` to its rank (the first ``r_j`` rows of every ``A``, columns of every ``B``)
and uploads ``A_j, B_j``; the server pads every upload with zeros to ``r_max`` and averages, weighted by
the data shares ``w_k`` of this round's uploads::

    G = sum_k w_k pad(c_k A_k, c_k B_k)          client j receives  (G_A[:r_j], G_B[:, :r_j]) / c_j

**PEFT's scale.** Client k's layer adds ``s_k B_k A_k`` with ``s_k = alpha / r_k``. With ``scale_aware:
true`` (default) ``c_k = sqrt(s_k / s_max)`` (``s_max`` the scale of rank ``r_max``): ``G`` is held in
the units of rank ``r_max``, so each rank-1 component ``b a^T`` of an upload adds the same delta to
``G`` as it added to its client's layer, and a truncation sent down adds to the client's layer exactly
the delta its components have in ``G`` (``s_j B_j A_j = s_max G_B[:, :r_j] G_A[:r_j]``). With
``scale_aware: false`` the raw factors are averaged (``c_k = 1``), so a component's delta changes by
``r_k / r_j`` when it moves from a rank-``r_k`` to a rank-``r_j`` client.

What is exact and what is not: as FedAvg, the average of the factors is not the average of the deltas
(cross terms ``B_i A_j``); zero padding also shrinks the components beyond ``r_k`` by the weight of the
clients that do not have them; and a client of rank ``r_j < r_max`` drops the components beyond
``r_j``. The relative size of the dropped part, ``||G_B G_A - G_B[:, :r] G_A[:r]||_F / ||G_B G_A||_F``,
is logged per round for every rank below ``r_max`` (``truncation_error_r<r>_mean`` / ``_max``).

Not implemented: the paper's rank self-pruning (clients shrink their rank when the last components
are small) and its sparsity-weighted aggregation; the weights here are data shares. Before the first
aggregation each client starts from its rank's initial adapter. With one rank for everybody this is
exactly ``fedit`` (FedAvg; tested bit for bit).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from mira.federated.strategies.base import FitIns, FitRes, Strategy, register_strategy, weighted_average
from mira.federated.strategies.products import _prod_sq_norm, _summary, lora_pairs
from mira.federated.strategies.ranks import pad, peft_scale, rank_of, rescale, truncate


class HetLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale_aware: bool = True


@register_strategy
class HetLoRA(Strategy):
    name = "hetlora"
    Params = HetLoRAParams
    personalized = True  # clients of different ranks evaluate different truncations
    heterogeneous_ranks = True

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        self.ranks = list(ctx.ranks) if ctx.ranks else [rank_of(self.init)] * ctx.num_clients
        self.inits = ctx.inits or {rank_of(self.init): self.init}
        self.r_max = max(self.ranks)
        self.modules = lora_pairs(ctx.keys or list(self.init))
        self.global_adapter = None  # G, rank r_max (None until the first aggregation)
        self._build()

    def _c(self, rank: int) -> float:
        """``sqrt(s_r / s_max)``: factors of rank ``r`` in units of rank ``r_max`` (1 without ``scale_aware``)."""
        if not self.p.scale_aware:
            return 1.0
        return (peft_scale(self.ctx.lora_alpha, rank) / peft_scale(self.ctx.lora_alpha, self.r_max)) ** 0.5

    def _build(self) -> None:
        # one adapter per rank (the engine tells adapters apart by identity)
        ranks = sorted(set(self.ranks))
        if self.global_adapter is None:
            self.by_rank = {r: dict(self.inits[r]) for r in ranks}
        else:
            self.by_rank = {r: rescale(truncate(self.global_adapter, r), 1.0 / self._c(r)) for r in ranks}

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.by_rank[self.ranks[cid]])

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if not results:
            return {}
        padded = [pad(rescale(r.adapter, self._c(self.ranks[cid])), self.r_max) for cid, r in results.items()]
        merged = weighted_average(padded, [r.n_train for r in results.values()], self.ctx.keys or list(self.init))
        self.global_adapter = {**(self.global_adapter or {}), **merged}
        self._build()
        return self._truncation_errors()

    def _truncation_errors(self) -> dict:
        info = {}
        g = self.global_adapter
        for r in sorted(set(self.ranks)):
            if r == self.r_max:
                continue
            errors = []
            for m in self.modules:
                b, a = g[m.b_key].detach().double(), g[m.a_key].detach().double()
                full = _prod_sq_norm(b, a)
                dropped = _prod_sq_norm(torch.cat([b, -b[:, :r]], dim=1), torch.cat([a, a[:r]], dim=0))
                errors.append((dropped / full) ** 0.5 if full > 0 else 0.0)
            info.update(_summary(f"truncation_error_r{r}", errors))
        return info

    def adapter_for(self, cid: int):
        return self.by_rank[self.ranks[cid]]

    def state_dict(self) -> dict:
        return {"global": self.global_adapter}

    def load_state_dict(self, state: dict) -> None:
        self.global_adapter = state["global"]
        self._build()
