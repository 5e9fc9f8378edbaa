"""LoRA adapters as seen by the merger: modules, scalings, deltas and re-factoring.

A PEFT LoRA adapter stores, for every adapted ``nn.Linear`` called ``<module>``, the keys
``base_model.model.<module>.lora_A.weight`` (``r x in``) and ``...lora_B.weight``
(``out x r``); the layer adds ``scaling * B @ A`` to the module's weight, with
``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Averaging ``A`` and ``B``
separately is *not* averaging the deltas ``B @ A``: ``mean(B) @ mean(A)`` has cross terms
``B_i @ A_j``. The merger therefore offers both spaces (see ``docs/merge.md``):

* ``factors``: merge ``A`` and ``scaling * B`` tensor by tensor (cheap; what FedAvg does).
* ``delta``: merge ``scaling * B @ A`` (exact), then re-factor to rank ``r`` with a
  truncated SVD, ``delta ~= (U sqrt(S)) (sqrt(S) V^T)``, or add it to the base weights.

Every adapter written here has ``lora_alpha == r`` (scaling 1): the scalings of the inputs
are folded into ``B``.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from mira.errors import MiraError
from mira.merge.checkpoint import Checkpoint

KEY_PREFIX = "base_model.model."
"""PEFT's prefix of saved keys in front of the base model's module path."""
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer."""

    name: str
    """Module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``."""
    a_key: str
    b_key: str

    @property
    def weight_key(self) -> str:
        """Name of the adapted weight in the base model's checkpoint."""
        return f"{self.name}.weight"


def is_factor_key(key: str) -> bool:
    """Whether a saved adapter key is a LoRA parameter (factor, magnitude vector, ...)."""
    return ".lora_" in key


def lora_modules(keys: Iterable[str], where: str) -> list[LoraModule]:
    """The linear LoRA modules among an adapter's saved keys, in key order."""
    keys = list(keys)
    key_set = set(keys)
    modules = []
    for key in keys:
        if not key.endswith(_A_SUFFIX):
            continue
        stem = key[: -len(_A_SUFFIX)]
        if stem + _B_SUFFIX not in key_set:
            raise MiraError(f"adapter has {key} but no matching lora_B", where=where)
        name = stem.removeprefix(KEY_PREFIX)
        modules.append(LoraModule(name=name, a_key=key, b_key=stem + _B_SUFFIX))
    return modules


def check_delta_supported(adapter: Checkpoint) -> None:
    """``space: delta`` handles plain linear LoRA; refuse what it would silently get wrong."""
    if adapter.config.get("peft_type", "LORA") != "LORA":
        raise MiraError(f"{adapter.path} is a {adapter.config.get('peft_type')} adapter; only LoRA can be merged",
                        where=adapter.where)
    if adapter.config.get("use_dora"):
        raise MiraError("DoRA adapters cannot be merged in space: delta; use space: factors", where=adapter.where)
    covered = {k for m in lora_modules(adapter.names, adapter.where) for k in (m.a_key, m.b_key)}
    odd = [k for k in adapter.names if is_factor_key(k) and k not in covered]
    if odd:
        raise MiraError(f"space: delta supports LoRA on linear layers only; {adapter.path} also has {odd[0]}",
                        where=adapter.where)


def scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    """PEFT's ``alpha / r`` for ``module`` (``alpha / sqrt(r)`` with rsLoRA), honouring ``alpha_pattern``."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def refactor(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta``.

    The singular values are split evenly, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``. When
    ``rank`` exceeds ``min(delta.shape)`` the factors are padded with zeros, so every
    module of the output adapter has the same rank.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype)
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    return a, b


def output_config(template: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, Any]:
    """The ``adapter_config.json`` of a merged adapter: the first input's, with scaling 1.

    ``ranks`` maps module names to output ranks; the most common rank becomes ``r`` and the
    others go to ``rank_pattern`` (with ``alpha_pattern`` equal, so every scaling is 1).
    """
    counts = Counter(ranks.values())
    rank = counts.most_common(1)[0][0]
    others = {re.escape(module): r for module, r in ranks.items() if r != rank}
    config = dict(template)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern=others, alpha_pattern=dict(others))
    return config
