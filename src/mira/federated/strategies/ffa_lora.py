"""``ffa_lora`` (Sun et al. 2024): A frozen at the shared random initialisation; only B
is trained, sent and averaged. Since every client's A is the same, averaging B is exact."""
from __future__ import annotations

from mira.federated.strategies.base import FitIns, NoParams, register_strategy
from mira.federated.strategies.fedit import FedIT
from mira.models.adapters import is_lora_A


@register_strategy
class FFALoRA(FedIT):
    name = "ffa_lora"
    Params = NoParams  # averaging B under a shared A is exact: no `aggregation` option

    def wire_keys(self) -> list[str]:
        return [k for k in self.ctx.keys if not is_lora_A(k)]

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.global_adapter, frozen=frozenset(k for k in self.ctx.keys if is_lora_A(k)))
