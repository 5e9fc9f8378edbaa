"""``fedsa_lora`` (Guo et al., 2024, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning"): the A matrices are shared, the B matrices stay with their clients.

Each sampled client k starts from ``{A_global, B_k}`` (its own B, last trained by it; the
shared initialisation's B, i.e. zero, before its first round), trains both, and the server
sets ``A_global <- sum_k w_k A_k`` (weighted by training-set size, over this round's clients)
and keeps each uploaded ``B_k`` as that client's. Clients that were not sampled keep their B.
Evaluation is personalised: client k is scored with ``{A_global, B_k}``.

On the wire: the in-process engine and the Flower nodes keep no client state between
rounds, so B_k is held by the server and travels with A (down and up); ``bytes_up`` /
``bytes_down`` therefore count A and B, about twice what a deployment that keeps B on the
client would send (only A travels there).
"""
from __future__ import annotations

from mira.federated.strategies.base import FitIns, FitRes, Strategy, register_strategy, weighted_average
from mira.models.adapters import is_lora_A


@register_strategy
class FedSALoRA(Strategy):
    name = "fedsa_lora"
    personalized = True

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        self.a_keys = [k for k in ctx.keys if is_lora_A(k)]
        self.shared = {k: self.init[k] for k in self.a_keys}
        self.own = {cid: {k: v for k, v in self.init.items() if k not in self.shared} for cid in range(ctx.num_clients)}
        self._build()

    def _build(self) -> None:
        # one persistent dict per client (the engine tells adapters apart by identity)
        self.adapters = {cid: {k: self.shared[k] if k in self.shared else self.own[cid][k] for k in self.ctx.keys}
                         for cid in range(self.ctx.num_clients)}

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.adapters[cid])

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if not results:
            return {}
        ordered = [results[cid] for cid in sorted(results)]
        self.shared = weighted_average([r.adapter for r in ordered], [r.n_train for r in ordered], self.a_keys)
        for cid in sorted(results):
            self.own[cid] = {k: v for k, v in results[cid].adapter.items() if k not in self.shared}
        self._build()
        return {}

    def adapter_for(self, cid: int):
        return self.adapters[cid]

    def state_dict(self) -> dict:
        return {"shared": dict(self.shared), "own": dict(self.own)}

    def load_state_dict(self, state: dict) -> None:
        self.shared, self.own = dict(state["shared"]), dict(state["own"])
        self._build()
