"""``flora`` (after Wang et al., NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations"): the exact sum of the clients' LoRA products by stacking, for
clients of any ranks.

Client k (rank ``r_k``, PEFT scale ``s_k = alpha / r_k``) uploads ``A_k`` (``r_k x in``) and ``B_k``
(``out x r_k``). In every module the server forms the exact weighted average of the deltas::

    D = sum_k w_k s_k B_k A_k = [w_1 s_1 B_1 .. w_K s_K B_K] @ [A_1; ..; A_K]

a stacked adapter of rank ``sum_k r_k`` (``w_k`` the data shares of this round's uploads), and sends
client j the best rank-``r_j`` approximation of ``D``, as factors of its own scale:
``B_j A_j = D_{r_j} / s_j`` (truncated SVD through the stacked QR core, ``strategies/ranks.py``;
``B_j = U sqrt(S) / sqrt(s_j)``, ``A_j = sqrt(S) V^T / sqrt(s_j)``). No ``out x in`` matrix is formed.

What is exact and what is not: ``D`` is exact; what a client receives is its truncation, whose relative
error ``||D - s_j B_j A_j||_F / ||D||_F`` is logged per round and rank (``svd_error_r<r>_mean`` /
``_max``; ``svd_error_mean`` / ``_max`` over all ranks and modules). The paper adds the stacked ``D``
to the base weights each round and starts fresh LoRA modules, so nothing is truncated there; here the
base model is frozen and shared, so the server keeps ``D`` in each client's own rank instead.

Every client of a rank gets the same adapter (the federation has one global delta; ranks differ
only in how much of it they hold). Before the first aggregation each client starts from its rank's
initial adapter (what a homogeneous run of that rank starts from). With one rank for everybody this
is exactly ``fedit`` with ``aggregation: exact`` (tested bit for bit).
"""
from __future__ import annotations

from mira.federated.strategies.base import FitIns, FitRes, Strategy, data_size_weights, register_strategy
from mira.federated.strategies.products import lora_pairs
from mira.federated.strategies.ranks import error_summary, peft_scale, rank_of, refactor_sum, rescale


@register_strategy
class FLoRA(Strategy):
    name = "flora"
    personalized = True  # clients of different ranks evaluate different truncations
    heterogeneous_ranks = True

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        self.ranks = list(ctx.ranks) if ctx.ranks else [rank_of(self.init)] * ctx.num_clients
        inits = ctx.inits or {rank_of(self.init): self.init}
        self.by_rank = {r: dict(inits[r]) for r in sorted(set(self.ranks))}
        self.modules = lora_pairs(ctx.keys or list(self.init))

    def scale(self, rank: int) -> float:
        return peft_scale(self.ctx.lora_alpha, rank)

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.by_rank[self.ranks[cid]])

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if not results:
            return {}
        weights = data_size_weights([r.n_train for r in results.values()])
        ranks = sorted(self.by_rank)
        ref = self.scale(max(ranks))  # D is computed in units of the largest rank's scale
        terms = [(w * (self.scale(self.ranks[cid]) / ref), r.adapter) for (cid, r), w in zip(results.items(), weights)]
        merged, errors = refactor_sum(terms, self.modules, ranks, self.by_rank)
        # back to each rank's own scale: s_j B_j A_j = ref * (B A)_{r_j}
        self.by_rank = {r: rescale(merged[r], (ref / self.scale(r)) ** 0.5) for r in ranks}
        return {**error_summary(errors), "stacked_rank": int(sum(self.ranks[cid] for cid in results))}

    def adapter_for(self, cid: int):
        return self.by_rank[self.ranks[cid]]

    def state_dict(self) -> dict:
        return {"by_rank": dict(self.by_rank)}

    def load_state_dict(self, state: dict) -> None:
        self.by_rank = dict(state["by_rank"])
