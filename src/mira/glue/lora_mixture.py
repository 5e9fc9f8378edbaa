"""LoRA-level mixture: several adapters on one base, mixed per sequence by router weights.

PEFT holds a second adapter, ``mixture``, whose rank is the sum of the experts' ranks. For
an input with router weights ``w``, its factors are the experts' factors stacked::

    A = [A_1; ...; A_E]        B = [w_1 s_1 B_1, ..., w_E s_E B_E] / s

so that ``s * B @ A = sum_e w_e s_e B_e A_e`` exactly (``s_e = alpha_e / r_e`` is expert
``e``'s LoRA scale, ``s`` the mixture adapter's). Each sequence is scored with its own
weights; the base model is shared, and the experts' states stay in memory.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mira.data.prompts import TokenizedDataset
from mira.glue.scoring import Evaluator, SeqLosses, sequence_losses

MIXTURE = "mixture"


def stack_experts(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float], scales: Sequence[float],
                  mixture_scale: float) -> dict[str, Tensor]:
    """The ``mixture`` adapter's state for one set of expert weights (PEFT key names)."""
    out: dict[str, Tensor] = {}
    for key in states[0]:
        if ".lora_A." in key:
            out[key] = torch.cat([s[key].float() for s in states], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([s[key].float() * (w * sc / mixture_scale)
                                  for s, w, sc in zip(states, weights, scales)], dim=1)
    return out


class LoraMixture:
    """Per-sequence weighted mixture of adapters on the evaluator's base model."""

    def __init__(self, evaluator: Evaluator, states: Sequence[Mapping[str, Tensor]]):
        from peft import LoraConfig

        from mira.models.adapters import AdapterSlot

        if evaluator.kind != "adapter":
            raise ValueError("a LoRA-level mixture needs adapters")
        self.evaluator = evaluator
        self.states = list(states)
        cfg = evaluator.lora_config
        # the evaluator's slot has scaling alpha / r (1 for the zoo's common form, where each member's own
        # PEFT scaling is already folded into B; see mira.glue.zoo.normalise_adapters)
        self.scales = [float(cfg.lora_alpha) / float(cfg.r)] * len(states)
        rank = int(cfg.r) * len(states)
        self.scale = 1.0
        model = evaluator.model
        if MIXTURE in model.peft_config:
            model.delete_adapter(MIXTURE)
        model.add_adapter(MIXTURE, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                              target_modules=list(cfg.target_modules), bias="none",
                                              task_type="CAUSAL_LM"))
        self.slot = AdapterSlot(model, adapter_name=MIXTURE)

    def state_for(self, weights: Sequence[float]) -> dict[str, Tensor]:
        return stack_experts(self.states, weights, self.scales, self.scale)

    def fixed_losses(self, ds: TokenizedDataset, weights: Sequence[float]) -> SeqLosses:
        """Per-sequence losses with the same ``weights`` for every sequence (batched)."""
        model = self.evaluator.model
        model.set_adapter(MIXTURE)
        try:
            self.slot.set(self.state_for([float(w) for w in weights]))
            return sequence_losses(model, ds, self.evaluator.pad_id, self.evaluator.batch_size)
        finally:
            model.set_adapter("default")

    def losses(self, ds: TokenizedDataset, weights: Tensor | np.ndarray) -> SeqLosses:
        """Per-sequence losses, sequence ``i`` answered by the mixture with ``weights[i]``."""
        model = self.evaluator.model
        model.set_adapter(MIXTURE)
        nll, tok = np.zeros(len(ds)), np.zeros(len(ds))
        try:
            for i in range(len(ds)):
                self.slot.set(self.state_for([float(w) for w in weights[i]]))
                one = sequence_losses(model, ds.subset([i]), self.evaluator.pad_id, 1)
                nll[i], tok[i] = one.nll[0], one.tokens[0]
        finally:
            model.set_adapter("default")
        return SeqLosses(nll, tok)
