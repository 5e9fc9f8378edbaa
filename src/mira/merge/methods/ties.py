"""``ties``: TIES-Merging, trim / elect sign / disjoint merge (Yadav et al., 2023).

For every tensor, with task vectors ``tau_i = theta_i - theta_base``:

1. **Trim**: keep exactly ``k = max(1, floor(density_i * n))`` entries of ``tau_i``, those of
   largest magnitude (mergekit's ``magnitude`` sparsification and its rounding), and zero the
   rest -> ``trimmed_i``. Among entries of equal magnitude at the cut (frequent in bf16/fp16
   checkpoints) the lower flat indices are kept, so the result is deterministic.
   ``rescale`` (default ``none``) can then scale the survivors: ``l1`` so that ``trimmed_i``
   keeps the L1 norm of ``tau_i`` (mergekit's ``rescale: true``), ``inverse_density`` by
   ``1 / density_i``.
2. **Elect**: per entry, the sign of ``sum_i w_i trimmed_i`` (the side with the larger
   total weighted magnitude; a tie counts as ``+``).
3. **Disjoint merge**: per entry, average only the models whose weighted trimmed value
   ``w_i trimmed_i`` is non-zero and has the elected sign:
   ``tau = sum_{i in A} w_i trimmed_i / sum_{i in A} w_i`` (0 where no model agrees).
   ``normalize: false`` skips the division.

    theta = theta_base + lambda * tau

These are mergekit's semantics (``consensus_method: sum``, weighted mean over agreeing
models; defaults ``normalize: true``, ``rescale: false``). The method streams: a first pass
over the inputs finds each model's magnitude cut and the elected signs, a second pass
re-reads the inputs and accumulates the agreeing entries, so only one input is held at a
time. Sign election and the disjoint merge are shared with ``dare`` (``combine: ties``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from mira.merge.registry import MergeMethod, MergeParams, apply_to_base, register_method, task_vectors, weighted_sum

Rescale = Literal["l1", "inverse_density", "none"]
RESCALE_EPS = 1e-7
"""``l1`` rescaling leaves a tensor as it is when its norm before or after masking is below this (as mergekit)."""
_CHUNK = 1 << 20


def kept_count(density: float, numel: int) -> int:
    """Entries kept by magnitude at ``density``: ``max(1, int(density * numel))``, as mergekit's ``magnitude``."""
    return max(1, int(density * numel))


@dataclass(frozen=True)
class MagnitudeCut:
    """Which entries a magnitude trim keeps, in O(1) memory so a second pass can redo it exactly.

    Kept: every entry with ``|x| > threshold``, and the entries with ``|x| == threshold`` up to
    flat index ``last_tied`` (all of them when ``last_tied`` is ``None``).
    """

    threshold: float
    last_tied: int | None = None


def magnitude_threshold(tau: Tensor, density: float) -> MagnitudeCut | None:
    """The cut that keeps exactly ``kept_count(density, n)`` largest-magnitude entries; ``None`` keeps all."""
    numel = tau.numel()
    if density >= 1.0 or numel == 0:
        return None
    k = kept_count(density, numel)
    magnitudes = tau.detach().reshape(-1).abs()
    if magnitudes.dtype not in (torch.float32, torch.float64):
        magnitudes = magnitudes.float()  # exact for bf16/fp16; numpy has neither
    magnitudes = magnitudes.numpy()
    # an in-place selection: unlike torch.kthvalue/topk, no copy and no int64 index buffer
    magnitudes.partition(numel - k)
    threshold = float(magnitudes[numel - k])
    top = magnitudes[numel - k:]  # the k largest, in no particular order
    tied_needed = k - int((top > threshold).sum())
    tied_total = int((magnitudes == threshold).sum())
    if tied_needed == tied_total:
        return MagnitudeCut(threshold)
    return MagnitudeCut(threshold, _nth_tied_index(tau.detach().reshape(-1), threshold, tied_needed))


def _nth_tied_index(flat: Tensor, threshold: float, nth: int) -> int:
    """Flat index of the ``nth`` (1-based) entry whose magnitude equals ``threshold``; scans in chunks."""
    seen = 0
    for start in range(0, flat.numel(), _CHUNK):
        tied = flat[start:start + _CHUNK].abs() == threshold
        count = int(tied.sum())
        if seen + count >= nth:
            return start + int(tied.nonzero()[nth - seen - 1])
        seen += count
    raise ValueError(f"fewer than {nth} entries of magnitude {threshold}")


def keep_mask(tau: Tensor, cut: MagnitudeCut) -> Tensor:
    """Boolean mask (shape of ``tau``) of the entries ``cut`` keeps."""
    magnitudes = tau.detach().abs().reshape(-1)
    keep = magnitudes > cut.threshold
    tied = magnitudes == cut.threshold
    if cut.last_tied is not None:
        tied[cut.last_tied + 1:] = False
    return keep.logical_or_(tied).view(tau.shape)


def rescale_kept(original: Tensor, kept: Tensor, mode: Rescale, density: float, l1_before: float | None = None,
                 in_place: bool = False) -> Tensor:
    """Scale the survivors ``kept`` of ``original``.

    ``l1``: by ``|original|_1 / |kept|_1`` (unchanged when either is below ``RESCALE_EPS``, as
    mergekit's ``rescaled_masked_tensor``); ``inverse_density``: by ``1 / density``; ``none``: not at
    all. ``l1_before`` is ``|original|_1`` when ``original`` has been overwritten already.
    """
    if mode == "none" or density >= 1.0:
        return kept
    if mode == "inverse_density":
        return kept.div_(density) if in_place else kept / density
    if mode == "l1":
        before = float(original.abs().sum()) if l1_before is None else l1_before
        after = float(kept.abs().sum())
        if before < RESCALE_EPS or after < RESCALE_EPS:
            return kept
        scale = before / after
    else:
        raise ValueError(f"unknown rescale {mode!r}")
    return kept.mul_(scale) if in_place else kept * scale


def trim(tau: Tensor, cut: MagnitudeCut | None, in_place: bool = False) -> Tensor:
    """Zero the entries of ``tau`` that ``cut`` does not keep (in ``tau`` itself if ``in_place``)."""
    if cut is None:
        return tau
    drop = keep_mask(tau, cut).logical_not_()
    return tau.masked_fill_(drop, 0.0) if in_place else tau.masked_fill(drop, 0.0)


def trim_to_density(tau: Tensor, density: float, rescale: Rescale = "none") -> Tensor:
    """Keep the ``kept_count(density, n)`` largest-magnitude entries of ``tau`` (then ``rescale`` them)."""
    return rescale_kept(tau, trim(tau, magnitude_threshold(tau, density)), rescale, density)


def elect_sign(taus: Iterable[Tensor], weights: Sequence[float]) -> Tensor:
    """Per entry, +1 or -1: the sign of ``sum_i w_i tau_i`` (0 counts as +1)."""
    total = weighted_sum(taus, weights)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def disjoint_merge(taus: Iterable[Tensor], weights: Sequence[float], sign: Tensor, normalize: bool) -> Tensor:
    """Weighted mean (or sum) over the models whose weighted entry ``w_i tau_i`` is non-zero with sign ``sign``.

    As mergekit, agreement is judged on the weighted value, so a model with a negative weight
    agrees where its own entry has the opposite sign; a zero weight never agrees.
    """
    total = torch.zeros_like(sign)
    weight_sum = torch.zeros_like(sign) if normalize else None
    for tau, weight in zip(taus, weights, strict=True):
        if weight == 0:
            continue
        agrees = tau * sign > 0 if weight > 0 else tau * sign < 0  # zero entries never agree
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
    parameters = frozenset({"lambda", "density", "normalize", "rescale"})
    model_parameters = frozenset({"weight", "density"})

    def merge_tensor(self, tensors: Sequence[Tensor], weights: Sequence[float], base: Tensor | None,
                     params: MergeParams) -> Tensor:
        cuts: list[MagnitudeCut | None] = []
        rescale = params.rescale or "none"
        own = base is not None  # then every tau = theta - base is a new tensor, trimmed in place

        def trimmed(i: int, tau: Tensor, cut: MagnitudeCut | None) -> Tensor:
            l1_before = float(tau.abs().sum()) if rescale == "l1" and cut is not None else None
            kept = trim(tau, cut, in_place=own)
            # trim made a new tensor unless it trimmed in place or kept everything
            return rescale_kept(tau, kept, rescale, params.density(i), l1_before=l1_before,
                                in_place=own or cut is not None)

        def trimmed_first_pass() -> Iterator[Tensor]:
            for i, tau in enumerate(task_vectors(tensors, base)):
                cuts.append(magnitude_threshold(tau, params.density(i)))
                yield trimmed(i, tau, cuts[-1])

        sign = elect_sign(trimmed_first_pass(), weights)
        second_pass = (trimmed(i, tau, cut) for i, (tau, cut) in enumerate(zip(task_vectors(tensors, base), cuts)))
        delta = disjoint_merge(second_pass, weights, sign, normalize=params.normalize is not False)
        return apply_to_base(delta, base, params.lam)
