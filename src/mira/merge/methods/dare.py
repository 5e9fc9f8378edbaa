"""``dare``: Drop And REscale task vectors, then combine them (Yu et al., 2024).

For every tensor and model, with ``p_i = 1 - density_i`` (``drop_rate`` sets it for all):

    mask_i ~ Bernoulli(1 - p_i)            per entry
    tau'_i = mask_i * tau_i / (1 - p_i)    so that E[tau'_i] = tau_i

then ``combine: linear`` (default) gives task arithmetic on the sparsified vectors,

    theta = theta_base + lambda * sum_i w_i tau'_i      (/ sum_i w_i with normalize: true)

and ``combine: ties`` elects a sign per entry and takes the disjoint mean, as in ``ties``
(mergekit's ``dare_ties``; no magnitude trim).

The random stream of each (tensor, model) pair is seeded from ``seed``, the tensor name
and the model's index, so a merge is reproducible whatever order tensors are read in, and
``combine: ties`` can stream: it draws the same drops again in its second pass over the
inputs instead of keeping the sparsified vectors.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import torch
from torch import Tensor

from mira.errors import MiraError
from mira.merge.methods.ties import disjoint_merge, elect_sign
from mira.merge.registry import (MergeMethod, MergeParams, apply_to_base, check_weight_sum, register_method,
                                 task_vectors, weighted_sum)


def stream_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for the random drops of model ``index`` on tensor ``name``."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_and_rescale(tau: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """Zero each entry with probability ``drop_rate``; divide the survivors by ``1 - drop_rate``."""
    if drop_rate <= 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return torch.where(keep, tau / (1.0 - drop_rate), 0.0)


@register_method
class DareMerge(MergeMethod):
    """Randomly sparsify each task vector (keeping its expectation), then task arithmetic or TIES."""

    name = "dare"
    uses_base = True
    parameters = frozenset({"lambda", "density", "drop_rate", "normalize", "combine", "seed"})
    model_parameters = frozenset({"weight", "density"})

    def validate(self, weights: Sequence[float], params: MergeParams) -> None:
        if params.densities is None:
            raise MiraError("dare needs a drop rate: set parameters.drop_rate (or a density per model)",
                            where="parameters.drop_rate")
        if params.combine == "linear" and params.normalize:
            check_weight_sum(weights, self.name)

    def merge_tensor(self, tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None,
                     params: MergeParams) -> Tensor:
        if params.combine == "ties":  # two passes; the seeded drops repeat exactly in the second
            sign = elect_sign(self._sparse(tensors, base, params), weights)
            delta = disjoint_merge(self._sparse(tensors, base, params), weights, sign,
                                   normalize=params.normalize is not False)
        else:
            delta = weighted_sum(self._sparse(tensors, base, params), weights)
            if params.normalize:
                delta /= sum(weights)
        return apply_to_base(delta, base, params.lam)

    @staticmethod
    def _sparse(tensors: Sequence[Tensor], base: Tensor | None, params: MergeParams) -> Iterator[Tensor]:
        """The dropped-and-rescaled task vectors, one at a time."""
        for i, tau in enumerate(task_vectors(tensors, base)):
            generator = torch.Generator().manual_seed(stream_seed(params.seed, params.name, i))
            yield drop_and_rescale(tau, 1.0 - params.density(i), generator)
