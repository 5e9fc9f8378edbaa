"""``task_arithmetic``: add the weighted sum of task vectors to the base (Ilharco et al., 2023).

    theta = theta_base + lambda * sum_i w_i (theta_i - theta_base)

With ``normalize: true`` the sum is divided by ``sum_i w_i``.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mira.merge.registry import (MergeMethod, MergeParams, apply_to_base, check_weight_sum, register_method,
                                 task_vectors, weighted_sum)


@register_method
class TaskArithmeticMerge(MergeMethod):
    """Base plus lambda times the weighted sum of the task vectors."""

    name = "task_arithmetic"
    uses_base = True
    parameters = frozenset({"lambda", "normalize"})

    def validate(self, weights: Sequence[float], params: MergeParams) -> None:
        if params.normalize:
            check_weight_sum(weights, self.name)

    def merge_tensor(self, tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None,
                     params: MergeParams) -> Tensor:
        delta = weighted_sum(task_vectors(tensors, base), weights)
        if params.normalize:
            delta /= sum(weights)
        return apply_to_base(delta, base, params.lam)
