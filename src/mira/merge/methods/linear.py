"""``linear``: the weighted average of the models ("model soup").

    theta = sum_i w_i theta_i / sum_i w_i

With ``normalize: false`` the division is skipped (a plain weighted sum).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from mira.merge.registry import MergeMethod, MergeParams, check_weight_sum, register_method, weighted_sum


@register_method
class LinearMerge(MergeMethod):
    """Weighted average of the models' weights; needs no base model."""

    name = "linear"
    parameters = frozenset({"normalize"})

    def validate(self, weights: Sequence[float], params: MergeParams) -> None:
        if params.normalize is not False:
            check_weight_sum(weights, self.name)

    def merge_tensor(self, tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None,
                     params: MergeParams) -> Tensor:
        out = weighted_sum(tensors, weights)
        if params.normalize is not False:
            out /= sum(weights)
        return out
