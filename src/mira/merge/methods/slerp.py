"""``slerp``: spherical linear interpolation between exactly two models, tensor by tensor.

With ``a``, ``b`` the two tensors flattened and ``Omega`` the angle between them,

    slerp(t; a, b) = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b

so ``t = 0`` gives the first model and ``t = 1`` the second. As in mergekit, a full-model
recipe's ``base_model`` is the ``t = 0`` end: the engine puts it first whatever its place in
``models``, or adds it when ``models`` lists only the other model. When the tensors are (anti-)
parallel (``|cos Omega| > 0.9995``) or one is zero, the formula is ill-conditioned and the
merge falls back to the linear interpolation ``(1 - t) a + t b``, as mergekit does.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from mira.merge.registry import MergeMethod, MergeParams, register_method

PARALLEL_THRESHOLD = 0.9995
"""``|cos Omega|`` above which slerp falls back to linear interpolation."""
_EPS = 1e-8


def lerp(t: float, a: Tensor, b: Tensor) -> Tensor:
    """``(1 - t) a + t b``."""
    return a * (1.0 - t) + b * t


def slerp(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Spherical interpolation of ``a`` and ``b`` treated as single vectors."""
    norm_a, norm_b = a.norm().item(), b.norm().item()
    if norm_a < _EPS or norm_b < _EPS:
        return lerp(t, a, b)
    cos = (a.reshape(-1).double() @ b.reshape(-1).double()).item() / (norm_a * norm_b)
    if abs(cos) > PARALLEL_THRESHOLD:
        return lerp(t, a, b)
    omega = math.acos(max(-1.0, min(1.0, cos)))
    sin_omega = math.sin(omega)
    return a * (math.sin((1.0 - t) * omega) / sin_omega) + b * (math.sin(t * omega) / sin_omega)


@register_method
class SlerpMerge(MergeMethod):
    """Spherical interpolation between two models with parameter ``t``; weights are not used."""

    name = "slerp"
    base_is_endpoint = True
    num_models = 2
    parameters = frozenset({"t"})
    model_parameters = frozenset()

    def merge_tensor(self, tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None,
                     params: MergeParams) -> Tensor:
        first, second = tensors
        return slerp(params.t, first, second)
