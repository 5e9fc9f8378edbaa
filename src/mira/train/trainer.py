"""Local training: R steps (or E epochs) of AdamW on the LoRA tensors now in the slot.

The trainer owns no model: it trains whatever adapter the ``AdapterSlot`` holds and
leaves the result there. Options used by the algorithms:

* ``frozen``: keys excluded from training (FFA-LoRA freezes every ``lora_A``);
* ``prox_mu`` and ``anchor``: FedProx's ``mu/2 * ||theta - theta_anchor||^2``.

``TrainSettings.gradient_checkpointing`` recomputes each decoder layer's activations in
the backward pass (non-reentrant ``torch.utils.checkpoint``): the same loss and gradients,
less activation memory, about a third more compute.

Batches are drawn from a seeded generator: the same seed gives the same batches, the
same dropout masks and so the same adapter, which is what makes resume exact. No batch
holds an example twice (see ``batch_indices``).

``TrainResult.loss`` is the mean *task* loss over the steps (the language-model loss on
the response tokens); FedProx's proximal term is reported apart, as ``prox_term``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from mira.data.prompts import TokenizedDataset, collate
from mira.models.adapters import AdapterSlot, AdapterState


@dataclass
class TrainSettings:
    lr: float = 3e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    steps: int | None = 10
    epochs: float | None = None
    gradient_checkpointing: bool = False
    # sample-level DP-SGD (``mira.privacy.dp_sgd``): Poisson batches, per-example clipping and noise
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_secure_noise: bool = False

    def num_steps(self, n_examples: int) -> int:
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_examples / self.batch_size))
        return int(self.steps or 1)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    loss: float  # mean task loss per step (without FedProx's proximal term)
    step_time_s: float  # forward + backward + optimiser time only
    prox_term: float = 0.0  # mean of mu/2 ||theta - theta_anchor||^2 per step (0 without FedProx)


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of size ``min(batch_size, n)`` from successive seeded permutations.

    The examples are taken in the order of a queue fed with one permutation of ``range(n)``
    after another. When a batch straddles two permutations, an example the batch already
    holds (from the end of the previous permutation) is not taken twice: it stays at the
    head of the queue and goes into the next batch. So no batch repeats an example, every
    example is still used once per permutation, and batches that never straddled a repeat
    are the same as a plain split of the permutations (same seed, same batches)."""
    rng = np.random.default_rng(seed)
    bs = min(batch_size, n)
    out: list[list[int]] = []
    queue: list[int] = []
    while len(out) < steps:
        if len(queue) < bs:
            queue += rng.permutation(n).tolist()
        batch, seen, deferred, i = [], set(), [], 0
        while len(batch) < bs:  # the queue holds a whole permutation, so bs distinct examples are there
            x = queue[i]
            i += 1
            if x in seen:
                deferred.append(x)
            else:
                seen.add(x)
                batch.append(x)
        out.append(batch)
        queue = deferred + queue[i:]
    return out


def set_gradient_checkpointing(model, on: bool) -> None:
    """Switch activation checkpointing on (or back off) for a (PEFT-wrapped) transformers model.

    Non-reentrant checkpointing gives gradients to the LoRA weights inside a checkpointed layer
    even though the frozen embeddings' output needs none; ``enable_input_require_grads`` also
    covers the reentrant variant should a model force it."""
    if bool(getattr(model, "is_gradient_checkpointing", False)) == on:
        return
    if on:
        if not getattr(model, "supports_gradient_checkpointing", True):
            from mira.errors import MiraError

            raise MiraError(f"{type(model).__name__} does not support gradient checkpointing",
                            where="train.gradient_checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()
        try:
            model.disable_input_require_grads()
        except (AttributeError, KeyError):  # the hook was never registered
            pass


class LocalTrainer:
    def __init__(self, slot: AdapterSlot, pad_id: int, settings: TrainSettings, device=None):
        self.slot = slot
        self.pad_id = pad_id
        self.settings = settings
        self.device = device or next(slot.model.parameters()).device

    def train(self, ds: TokenizedDataset, seed: int, *, frozen: frozenset[str] = frozenset(),
              prox_mu: float = 0.0, anchor: AdapterState | None = None, steps: int | None = None) -> TrainResult:
        s = self.settings
        if not len(ds):
            from mira.errors import MiraError

            raise MiraError("no training example to train on (the length policy may have dropped them all: "
                            "see data.max_length and data.overflow)", where="data.max_length")
        steps = steps if steps is not None else s.num_steps(len(ds))
        keys = [k for k in self.slot.keys() if k not in frozen]
        params = self.slot.trainable(keys)
        for k, p in self.slot.params.items():
            p.requires_grad_(k not in frozen)
        if s.dp_noise_multiplier is not None:
            from mira.privacy.dp_sgd import dp_train

            if prox_mu > 0:
                from mira.errors import MiraError

                raise MiraError("DP-SGD with FedProx's proximal term is not supported", where="privacy.sample")
            return dp_train(self, ds, seed, keys=keys, params=params, steps=steps, noise_multiplier=s.dp_noise_multiplier,
                            max_grad_norm=s.dp_max_grad_norm, batch_size=s.batch_size, lr=s.lr,
                            weight_decay=s.weight_decay, secure=s.dp_secure_noise)
        anchor_t = [anchor[k].to(self.device) for k in keys] if prox_mu > 0 and anchor is not None else None
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        batches = [collate(ds, idx, self.pad_id, self.device) for idx in batch_indices(len(ds), s.batch_size, steps, seed)]
        model = self.slot.model
        set_gradient_checkpointing(model, s.gradient_checkpointing)
        model.train()
        torch.manual_seed(seed)  # dropout masks
        total_loss, total_prox, tokens = 0.0, 0.0, 0
        t0 = time.perf_counter()
        for batch in batches:
            task_loss = model(**batch).loss
            loss = task_loss
            if anchor_t is not None:
                prox = prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor_t))
                loss = task_loss + prox
                total_prox += float(prox.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            total_loss += float(task_loss.detach())
            tokens += int(batch["attention_mask"].sum())
        elapsed = time.perf_counter() - t0
        model.eval()
        return TrainResult(steps=steps, tokens=tokens, loss=total_loss / max(1, steps), step_time_s=elapsed,
                           prox_term=total_prox / max(1, steps))
