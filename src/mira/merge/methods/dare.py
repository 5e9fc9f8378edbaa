"""``dare``: Drop And REscale task vectors, then combine them (Yu et al., 2024).

For every tensor and model, with ``p_i = 1 - density_i`` (``drop_rate`` sets it for all):

    mask_i ~ Bernoulli(1 - p_i)            per entry
    tau'_i = s_i * mask_i * tau_i

where the rescale factor ``s_i`` is set by ``rescale``:

* ``l1`` (default; mergekit's ``rescale: true``, its default for ``dare_*``):
  ``s_i = |tau_i|_1 / |mask_i * tau_i|_1``, so the sparsified vector keeps the L1 norm of the
  task vector (left unscaled when either norm is below 1e-7, as mergekit);
* ``inverse_density`` (the DARE paper): ``s_i = 1 / (1 - p_i)``, so that ``E[tau'_i] = tau_i``;
* ``none``: ``s_i = 1``.

Then ``combine: linear`` (default; mergekit's ``dare_linear``) gives task arithmetic on the
sparsified vectors,

    theta = theta_base + lambda * sum_i w_i tau'_i      (/ sum_i w_i with normalize: true)

and ``combine: ties`` (mergekit's ``dare_ties``) elects a sign per entry and keeps the agreeing
entries as ``ties`` does (no magnitude trim): their weighted sum, or their weighted mean with
``normalize: true``. ``normalize`` defaults to false with either combine, as in mergekit. The
method names ``dare_linear`` and ``dare_ties`` are registered too (``dare`` with that
``combine``), so mergekit recipes load as they are.

The random stream of each (tensor, model) pair is seeded from ``seed``, the tensor name and
the model's index, so a merge is reproducible whatever order tensors are read in, and
``combine: ties`` can stream: it draws the same drops again in its second pass over the
inputs instead of keeping the sparsified vectors.
"""
from __future__ import annotations

import hashlib
import logging
from typing import ClassVar, Iterator, Literal, Sequence

import torch
from torch import Tensor

from mira.errors import MiraError
from mira.merge.methods.ties import Rescale, disjoint_merge, elect_sign, rescale_kept
from mira.merge.registry import (MergeMethod, MergeParams, apply_to_base, check_weight_sum, register_method,
                                 task_vectors, weighted_sum)

logger = logging.getLogger(__name__)

DEFAULT_RESCALE: Rescale = "l1"
"""dare's rescaling when the recipe sets none: mergekit's (``rescale: true`` rescales to the L1 norm)."""
_RESCALE_NOTES = {
    "l1": "survivors scaled so that each task vector keeps its L1 norm, as mergekit's rescale: true",
    "inverse_density": "survivors divided by the density, as in the DARE paper",
    "none": "survivors not rescaled",
}


def stream_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for the random drops of model ``index`` on tensor ``name``."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_and_rescale(tau: Tensor, drop_rate: float, generator: torch.Generator,
                     rescale: Rescale = "inverse_density") -> Tensor:
    """Zero each entry with probability ``drop_rate``, then rescale the survivors.

    ``rescale``: ``inverse_density`` (this function's default) divides them by ``1 - drop_rate``,
    ``l1`` scales them so the result has the L1 norm of ``tau`` (the method's default), ``none``
    leaves them. The method passes its own setting (``DareMerge``, default ``l1``).
    """
    if drop_rate <= 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return rescale_kept(tau, torch.where(keep, tau, 0.0), rescale, 1.0 - drop_rate, in_place=True)


@register_method
class DareMerge(MergeMethod):
    """Randomly sparsify each task vector (keeping its expectation), then task arithmetic or TIES."""

    name = "dare"
    uses_base = True
    parameters = frozenset({"lambda", "density", "drop_rate", "normalize", "combine", "seed", "rescale"})
    model_parameters = frozenset({"weight", "density"})
    fixed_combine: ClassVar[Literal["linear", "ties"] | None] = None
    """Set by the mergekit-named aliases: ``dare_linear`` and ``dare_ties`` ignore ``combine``."""

    def combine(self, params: MergeParams) -> Literal["linear", "ties"]:
        """The combine step this merge runs."""
        return self.fixed_combine or params.combine

    def validate(self, weights: Sequence[float], params: MergeParams) -> None:
        if params.densities is None:
            raise MiraError(f"{self.name} needs a drop rate: set parameters.drop_rate (or a density per model)",
                            where="parameters.drop_rate")
        if params.rescale not in (None, *_RESCALE_NOTES):
            raise MiraError(f"rescale must be one of {sorted(_RESCALE_NOTES)}, got {params.rescale!r}",
                            where="parameters.rescale")
        if self.combine(params) == "linear" and params.normalize:
            check_weight_sum(weights, self.name)
        rescale = params.rescale or DEFAULT_RESCALE
        logger.info("%s (combine: %s, normalize: %s): rescale %s: %s", self.name, self.combine(params),
                    bool(params.normalize), rescale, _RESCALE_NOTES[rescale])

    def merge_tensor(self, tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None,
                     params: MergeParams) -> Tensor:
        normalize = bool(params.normalize)  # mergekit's default for dare_linear and dare_ties: false
        if self.combine(params) == "ties":  # two passes; the seeded drops repeat exactly in the second
            sign = elect_sign(self._sparse(tensors, base, params), weights)
            delta = disjoint_merge(self._sparse(tensors, base, params), weights, sign, normalize=normalize)
        else:
            delta = weighted_sum(self._sparse(tensors, base, params), weights)
            if normalize:
                delta /= sum(weights)
        return apply_to_base(delta, base, params.lam)

    @staticmethod
    def _sparse(tensors: Sequence[Tensor], base: Tensor | None, params: MergeParams) -> Iterator[Tensor]:
        """The dropped-and-rescaled task vectors, one at a time."""
        for i, tau in enumerate(task_vectors(tensors, base)):
            generator = torch.Generator().manual_seed(stream_seed(params.seed, params.name, i))
            yield drop_and_rescale(tau, 1.0 - params.density(i), generator, params.rescale or DEFAULT_RESCALE)


@register_method
class DareLinearMerge(DareMerge):
    """mergekit's ``dare_linear``: ``dare`` with ``combine: linear``."""

    name = "dare_linear"
    fixed_combine = "linear"
    parameters = DareMerge.parameters - {"combine"}


@register_method
class DareTiesMerge(DareMerge):
    """mergekit's ``dare_ties``: ``dare`` with ``combine: ties``."""

    name = "dare_ties"
    fixed_combine = "ties"
    parameters = DareMerge.parameters - {"combine"}
