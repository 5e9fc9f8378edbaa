"""``ties``: TIES-Merging, trim / elect sign / disjoint merge (Yadav et al., 2023).

For every tensor, with task vectors ``tau_i = theta_i - theta_base``:

1. **Trim**: keep the entries of ``tau_i`` whose magnitude is at least the ``k``-th largest,
   ``k = round(density_i * n)`` (at least 1), and zero the rest -> ``trimmed_i``. (With
   distinct magnitudes exactly ``k`` entries survive; ties at the threshold all survive.)
2. **Elect**: per entry, the sign of ``sum_i w_i trimmed_i`` (the side with the larger
   total weighted magnitude; a tie counts as ``+``).
3. **Disjoint merge**: per entry, average only the models whose trimmed value is non-zero
   and has the elected sign: ``tau = sum_{i in A} w_i trimmed_i / sum_{i in A} w_i``
   (0 where no model agrees). ``normalize: false`` skips the division.

    theta = theta_base + lambda * tau

These are mergekit's semantics (``consensus_method: sum``, weighted mean over agreeing
models). The method streams: a first pass over the inputs finds each model's magnitude
threshold and the elected signs, a second pass re-reads the inputs and accumulates the
agreeing entries, so only one input is held at a time. Sign election and the disjoint
merge are shared with ``dare`` (``combine: ties``).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from mira.merge.registry import MergeMethod, MergeParams, apply_to_base, register_method, task_vectors, weighted_sum


def magnitude_threshold(tau: Tensor, density: float) -> float | None:
    """The ``k``-th largest ``|tau|``, ``k = round(density * n)`` (at least 1); ``None`` keeps everything."""
    if density >= 1.0:
        return None
    magnitudes = tau.detach().reshape(-1).abs().float().numpy()
    k = max(1, round(density * magnitudes.size))
    # an in-place selection: unlike torch.kthvalue/topk, no copy and no int64 index buffer
    magnitudes.partition(magnitudes.size - k)
    return float(magnitudes[magnitudes.size - k])


def trim(tau: Tensor, threshold: float | None, in_place: bool = False) -> Tensor:
    """Zero the entries of ``tau`` whose magnitude is below ``threshold`` (in ``tau`` itself if ``in_place``)."""
    if threshold is None:
        return tau
    below = tau.abs() < threshold
    return tau.masked_fill_(below, 0.0) if in_place else tau.masked_fill(below, 0.0)


def trim_to_density(tau: Tensor, density: float) -> Tensor:
    """Keep the largest-magnitude ``density`` fraction of ``tau``."""
    return trim(tau, magnitude_threshold(tau, density))


def elect_sign(taus: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """Per entry, +1 or -1: the sign of ``sum_i w_i tau_i`` (0 counts as +1)."""
    total = weighted_sum(taus, weights)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def disjoint_merge(taus: Iterable[Tensor], weights: Sequence[float], sign: Tensor, normalize: bool) -> Tensor:
    """Weighted mean (or sum) over the models whose entry is non-zero with sign ``sign``."""
    total = torch.zeros_like(sign)
    weight_sum = torch.zeros_like(sign) if normalize else None
    for tau, weight in zip(taus, weights, strict=True):
        agrees = tau * sign > 0  # zero entries never agree
        total.add_(torch.where(agrees, tau, 0.0), alpha=weight)
        if weight_sum is not None:
            weight_sum.add_(agrees, alpha=weight)
    if weight_sum is None:
        return total
    # where no model agrees the total is 0 too; dividing those entries by 1 leaves them 0
    return total.div_(weight_sum.masked_fill_(weight_sum == 0, 1.0))


@register_method
class TiesMerge(MergeMethod):
    """Trim each task vector by magnitude, elect a sign per entry, average the agreeing entries."""

    name = "ties"
    uses_base = True
    parameters = frozenset({"lambda", "density", "normalize"})
    model_parameters = frozenset({"weight", "density"})

    def merge_tensor(self, tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None,
                     params: MergeParams) -> Tensor:
        thresholds: list[float | None] = []
        own = base is not None  # then every tau = theta - base is a new tensor, trimmed in place

        def trimmed_first_pass() -> Iterator[Tensor]:
            for i, tau in enumerate(task_vectors(tensors, base)):
                thresholds.append(magnitude_threshold(tau, params.density(i)))
                yield trim(tau, thresholds[-1], in_place=own)

        sign = elect_sign(trimmed_first_pass(), weights)
        trimmed = (trim(tau, threshold, in_place=own)
                   for tau, threshold in zip(task_vectors(tensors, base), thresholds))
        delta = disjoint_merge(trimmed, weights, sign, normalize=params.normalize is not False)
        return apply_to_base(delta, base, params.lam)
