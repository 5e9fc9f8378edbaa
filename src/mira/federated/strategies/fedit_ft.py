"""``fedit_ft``: FedIT, then every client fine-tunes the final global adapter on its own data
(a personalised baseline: "FedAvg + local fine-tuning").

Rounds 1..T are ``fedit`` (with its ``aggregation`` option). The run has one more round,
T+1, in which **every** client (whatever ``federation.fraction``) starts from the final
global adapter, trains ``finetune_steps`` local steps (default R, ``federation.local_steps``;
it must be a multiple of R: the client trains ``finetune_steps / R`` times its usual
budget, as with ``oneshot``'s ``step_scale``) and the server keeps each result as that
client's adapter; nothing is aggregated. Evaluation after round T+1 is personalised: client k
with its fine-tuned adapter (a client whose fine-tuned update was rejected keeps the global
one). The round counter and the fine-tuned adapters are in the checkpoint, so a resumed
run is exact, also when interrupted between round T and T+1.

Budget: T x R federated steps plus ``finetune_steps`` per client (more training than the
other algorithms by that much). Bytes: round T+1 sends the global adapter down and, in this
simulation, each fine-tuned adapter up (the server evaluates and exports it; a deployment
would keep it on the client).
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field

from mira.errors import MiraError
from mira.federated.strategies.base import FitIns, FitRes, register_strategy
from mira.federated.strategies.fedit import FedIT, FedITParams


class FedITFTParams(FedITParams):
    finetune_steps: Optional[int] = Field(None, gt=0, description="local fine-tuning steps; default R")


@register_strategy
class FedITFT(FedIT):
    name = "fedit_ft"
    rounds_extendable = False  # its fine-tuning round comes after federation.rounds
    uniform_steps = False  # its last round fine-tunes finetune_steps
    dp_central = False  # its last round keeps each client's own fine-tuned adapter
    Params = FedITFTParams
    personalized = True

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        self.scale = self._scale(params, ctx)
        self.personal: dict[int, dict] = {}
        self.done = 0  # rounds aggregated so far

    @staticmethod
    def _scale(params, ctx) -> int:
        """``finetune_steps / R`` (a whole number, else a ``MiraError``)."""
        r = max(1, int(ctx.local_steps))
        steps = params.finetune_steps if params.finetune_steps is not None else r
        if steps % r:
            raise MiraError(f"finetune_steps={steps} is not a multiple of the local steps R={r}; a client "
                            f"fine-tunes a whole number of its local budgets",
                            where="algorithm.finetune_steps (fedit_ft)")
        return steps // r

    @classmethod
    def check_setup(cls, params, ctx) -> None:
        cls._scale(params, ctx)

    def num_rounds(self, rounds: int) -> int:
        return rounds + 1

    def finetuning(self, rnd: int) -> bool:
        return rnd > self.ctx.rounds

    def select_clients(self, rnd: int, sampled: list[int]) -> list[int]:
        return list(range(self.ctx.num_clients)) if self.finetuning(rnd) else sampled

    def configure_fit(self, cid: int) -> FitIns:
        if self.finetuning(self.done + 1):
            return FitIns(adapter=self.global_adapter, step_scale=self.scale)
        return super().configure_fit(cid)

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        self.done = rnd
        if self.finetuning(rnd):
            for cid in sorted(results):
                self.personal[cid] = results[cid].adapter
            return {"finetuned_clients": sorted(results)}
        return super().aggregate_fit(rnd, results)

    def adapter_for(self, cid: int):
        return self.personal.get(cid, self.global_adapter)

    def state_dict(self) -> dict:
        return {"global": self.global_adapter, "personal": dict(self.personal), "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.global_adapter, self.personal, self.done = state["global"], dict(state["personal"]), int(state["done"])
