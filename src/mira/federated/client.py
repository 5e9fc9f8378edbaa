"""The client side of a round, shared by the in-process engine and the Flower ClientApp:
load the adapter the server sent into the one model, train, hand back the new one."""
from __future__ import annotations

from mira.data.prompts import TokenizedDataset
from mira.federated.strategies.base import FitIns
from mira.models.adapters import AdapterSlot, AdapterState
from mira.train.trainer import LocalTrainer, TrainResult


def client_fit(slot: AdapterSlot, trainer: LocalTrainer, ds: TokenizedDataset, ins: FitIns, seed: int,
               steps: int | None = None) -> tuple[AdapterState, TrainResult]:
    # Keys the server did not send (FFA-LoRA's frozen A) come from the shared initialisation.
    slot.set({**slot.initial_state, **ins.adapter})
    anchor = slot.get() if ins.prox_mu > 0 else None
    if steps is None and ins.step_scale != 1:
        steps = ins.step_scale * trainer.settings.num_steps(len(ds))
    result = trainer.train(ds, seed, frozen=ins.frozen, prox_mu=ins.prox_mu, anchor=anchor, steps=steps)
    return slot.get(), result
