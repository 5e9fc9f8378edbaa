"""LoRA products on the server: the exact average of ``B_k @ A_k`` and the error of FedAvg.

For one adapted module, client k uploads ``A_k`` (``r x in``) and ``B_k`` (``out x r``);
its layer adds ``s * B_k @ A_k`` to the frozen weight, with PEFT's ``s = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). Every client of a run has the same LoRA config, so
``s`` is the same for all of them in a given module and factors out of every formula below:
the exact average of the deltas is ``s * M`` with ``M = sum_k w_k B_k A_k`` (``w_k`` the
clients' data shares, summing to 1), and the relative errors are the same with or without ``s``.

* ``fedavg_error``: FedAvg of the factors gives ``mean(B) @ mean(A) = M + cross terms``;
  its relative Frobenius error ``||mean(B) mean(A) - M|| / ||M||``.
* ``exact_average``: the best rank-``r`` factorisation of ``M`` (truncated SVD,
  ``mira.merge.lora.refactor``: ``B = U sqrt(S)``, ``A = sqrt(S) V^T``), so the layer adds
  ``s * B @ A = s * M_r``, the best rank-r approximation of the exact average of the
  deltas; and ``(sqrt(s) B)(sqrt(s) A)`` is the symmetric split of that delta.

Neither forms an ``out x in`` matrix unless it is smaller than the ``K r x K r`` ones:
``M = [w_1 B_1 .. w_K B_K] @ [A_1; ..; A_K]`` has rank at most ``K r``; with the thin QR factorisations of the two stacked factors, ``M = Q_b (R_b R_a^T) Q_a^T``
and the SVD of ``M`` is that of the small ``K r x K r`` core, rotated by ``Q_b`` and ``Q_a``
(exact, not an approximation). Norms of products use ``||X Y||_F^2 = sum((X^T X) * (Y Y^T))``.
All arithmetic is in float64; results are cast back to the uploads' dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mira.merge.lora import LoraModule, lora_modules, refactor


def lora_pairs(keys: list[str]) -> list[LoraModule]:
    """The (A, B) key pairs of the linear LoRA modules among ``keys``."""
    return lora_modules(keys, where="adapter")


def _prod_sq_norm(x: Tensor, y: Tensor) -> float:
    """``||x @ y||_F^2`` in ``min(out * in, R^2)`` memory: through the ``R x R`` Gram matrices
    (``R`` = the stacked rank) when they are the smaller, else by forming the ``out x in`` product
    (with many clients or a large rank, ``R^2`` grows quadratically: at R = 20,559 one Gram
    matrix alone is 3.4 GB)."""
    if x.shape[0] * y.shape[1] <= x.shape[1] ** 2:
        return float(torch.linalg.matrix_norm(x @ y) ** 2)
    return float(((x.T @ x) * (y @ y.T)).sum().clamp_min(0))


def _stack(states: list[dict], weights: list[float], m: LoraModule) -> tuple[Tensor, Tensor]:
    b = torch.cat([w * s[m.b_key].detach().to("cpu", torch.float64) for s, w in zip(states, weights)], dim=1)
    a = torch.cat([s[m.a_key].detach().to("cpu", torch.float64) for s in states], dim=0)
    return b, a


def _summary(name: str, errors: list[float]) -> dict:
    if not errors:
        return {}
    return {f"{name}_mean": float(sum(errors) / len(errors)), f"{name}_max": float(max(errors))}


def fedavg_error(states: list[dict], weights: list[float], modules: list[LoraModule]) -> dict:
    """``||mean(B) mean(A) - mean(B A)||_F / ||mean(B A)||_F`` per module (weighted means,
    ``weights`` summing to 1), as ``fedavg_error_mean`` (unweighted mean over modules) and
    ``fedavg_error_max``. A module whose exact average is 0 counts as 0 error."""
    errors = []
    for m in modules:
        b, a = _stack(states, weights, m)  # M = b @ a
        b_bar = b.reshape(b.shape[0], len(states), -1).sum(dim=1)  # sum_k w_k B_k
        a_bar = sum(w * s[m.a_key].detach().to("cpu", torch.float64) for s, w in zip(states, weights))
        exact = _prod_sq_norm(b, a)
        # mean(B) mean(A) - M = [b_bar | -b] @ [a_bar; a]
        diff = _prod_sq_norm(torch.cat([b_bar, -b], dim=1), torch.cat([a_bar, a], dim=0))
        errors.append((diff / exact) ** 0.5 if exact > 0 else 0.0)
    return _summary("fedavg_error", errors)


def stacked_core(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(qb, core, qa)`` with ``b @ a = qb @ core @ qa^T`` (thin QR of the stacked factors; ``core``
    is ``R x R`` for ``R`` stacked columns of ``b``, rows of ``a``)."""
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
    return qb, rb @ ra.T, qa  # M = qb core qa^T


def split_core(qb: Tensor, core: Tensor, qa: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(A, B, error)``: the rank-``rank`` truncated SVD of ``M = qb core qa^T`` as ``B = U sqrt(S)``,
    ``A = sqrt(S) V^T`` (zero-padded when ``M`` has lower rank) and ``||M - B A||_F / ||M||_F``."""
    a_c, b_c = refactor(core, rank)
    norm = float(torch.linalg.matrix_norm(core))
    error = float(torch.linalg.matrix_norm(core - b_c @ a_c)) / norm if norm > 0 else 0.0
    return a_c @ qa.T, qb @ b_c, error


def exact_average(states: list[dict], weights: list[float], modules: list[LoraModule]) -> tuple[dict, dict]:
    """``(factors, info)``: for every module, ``A, B`` (same rank, dtype and shapes as the
    uploads) with ``B @ A`` the truncated SVD of ``sum_k w_k B_k A_k``; ``info`` has the
    relative truncation error ``||M - B A||_F / ||M||_F`` as ``svd_error_mean`` / ``svd_error_max``."""
    out, errors = {}, []
    for m in modules:
        ref_a, ref_b = states[0][m.a_key], states[0][m.b_key]
        rank = ref_a.shape[0]
        b, a = _stack(states, weights, m)
        a_m, b_m, error = split_core(*stacked_core(b, a), rank)
        errors.append(error)
        out[m.a_key] = a_m.to(ref_a.device, ref_a.dtype)
        out[m.b_key] = b_m.to(ref_b.device, ref_b.dtype)
    return out, _summary("svd_error", errors)
