"""Clients of different LoRA ranks (``lora.ranks``): who gets which rank, and the server's tools.

``client_ranks`` turns the config into one rank per client. A client of rank ``r_k`` trains a PEFT
adapter of rank ``r_k`` (``AdapterSlot.for_rank``), so its layer adds ``s_k * B_k @ A_k`` with
PEFT's ``s_k = alpha / r_k``: the scales differ between clients, and every formula of the
heterogeneous strategies is written on the actual deltas ``s_k B_k A_k``, not on the factors.

* ``truncate`` / ``pad``: the first ``r`` rows of ``A`` and columns of ``B``, or zeros appended;
* ``rescale``: both factors times ``c`` (the delta times ``c**2``), the identity (the same dict)
  when ``c == 1``, so that equal ranks leave every tensor bit for bit as it was;
* ``refactor_sum``: the exact sum ``sum_k c_k B_k A_k`` of products of any ranks, re-factored to
  one or several ranks by truncated SVD through the small stacked core (``products.py``; no
  ``out x in`` matrix is formed), with the relative truncation error per rank.
"""
from __future__ import annotations

import torch

from mira.errors import MiraError
from mira.federated.strategies.products import _summary, split_core, stacked_core
from mira.merge.lora import LoraModule
from mira.models.adapters import AdapterState


def client_ranks(ranks: list[int] | None, rank_by: str, n_train: list[int]) -> list[int] | None:
    """One LoRA rank per client (None without ``lora.ranks``).

    ``rank_by: client``: ``ranks[i % len(ranks)]`` for client ``i`` (one per client, or a shorter list
    cycled over the clients). ``rank_by: data_size``: the clients sorted by training-set size (ties by
    id) are cut into ``len(ranks)`` groups as equal as possible (terciles for 3 ranks); the ``g``-th
    group (smallest sizes first) gets ``ranks[g]``."""
    if ranks is None:
        return None
    k = len(n_train)
    if len(ranks) > k:
        raise MiraError(f"{len(ranks)} ranks for {k} clients: give at most one per client (a shorter list is "
                        "cycled over the clients, or grouped by data size with rank_by: data_size)", where="lora.ranks")
    if rank_by == "client":
        return [int(ranks[i % len(ranks)]) for i in range(k)]
    order = sorted(range(k), key=lambda i: (n_train[i], i))
    out = [0] * k
    groups = len(ranks)
    for g in range(groups):
        for i in order[g * k // groups:(g + 1) * k // groups]:
            out[i] = int(ranks[g])
    return out


def peft_scale(alpha: float, rank: int) -> float:
    """PEFT's LoRA scale ``alpha / r`` (mira's configs have no rsLoRA)."""
    return alpha / rank


def is_a(key: str) -> bool:
    return ".lora_A." in key


def is_b(key: str) -> bool:
    return ".lora_B." in key


def rank_of(state: AdapterState) -> int:
    """The rank of an adapter (that of its first ``lora_A``)."""
    return next(int(v.shape[0]) for k, v in state.items() if is_a(k))


def truncate(state: AdapterState, rank: int) -> AdapterState:
    """The first ``rank`` rows of every ``A`` and columns of every ``B`` (the same dict at its own rank)."""
    if rank_of(state) == rank:
        return state
    return {k: v[:rank].clone() if is_a(k) else v[:, :rank].clone() if is_b(k) else v for k, v in state.items()}


def pad(state: AdapterState, rank: int) -> AdapterState:
    """Zero rows appended to every ``A``, zero columns to every ``B``, up to ``rank`` (the same dict at its rank)."""
    r = rank_of(state)
    if r == rank:
        return state
    out = {}
    for k, v in state.items():
        if is_a(k):
            v = torch.cat([v, v.new_zeros(rank - r, v.shape[1])], dim=0)
        elif is_b(k):
            v = torch.cat([v, v.new_zeros(v.shape[0], rank - r)], dim=1)
        out[k] = v
    return out


def rescale(state: AdapterState, c: float) -> AdapterState:
    """Every LoRA factor times ``c`` (so every delta times ``c**2``); the same dict when ``c == 1``."""
    if c == 1.0:
        return state
    return {k: v * c if is_a(k) or is_b(k) else v for k, v in state.items()}


def refactor_sum(terms: list[tuple[float, AdapterState]], modules: list[LoraModule], ranks: list[int],
                 like: dict[int, AdapterState]) -> tuple[dict[int, AdapterState], dict[int, list[float]]]:
    """For each rank in ``ranks``, the factors whose product is the best approximation of that rank of
    ``M = sum_j c_j B_j A_j`` (``terms = [(c_j, adapter_j)]``, adapters of any ranks) in every module,
    with ``B = U sqrt(S)``, ``A = sqrt(S) V^T``; and the relative truncation errors ``||M - B A|| / ||M||``
    per rank and module. The stacked core is computed once per module and split to every rank.
    Arithmetic in float64; the results take the dtype and device of ``like[rank]`` (an adapter of that
    rank, whose keys other than the LoRA factors are copied)."""
    out = {r: dict(like[r]) for r in ranks}
    errors: dict[int, list[float]] = {r: [] for r in ranks}
    for m in modules:
        b = torch.cat([c * s[m.b_key].detach().to("cpu", torch.float64) for c, s in terms], dim=1)
        a = torch.cat([s[m.a_key].detach().to("cpu", torch.float64) for _, s in terms], dim=0)
        qb, core, qa = stacked_core(b, a)
        for r in ranks:
            a_r, b_r, err = split_core(qb, core, qa, r)
            ref_a, ref_b = like[r][m.a_key], like[r][m.b_key]
            out[r][m.a_key] = a_r.to(ref_a.device, ref_a.dtype)
            out[r][m.b_key] = b_r.to(ref_b.device, ref_b.dtype)
            errors[r].append(err)
    return out, errors


def error_summary(errors: dict[int, list[float]], per_rank: bool = True) -> dict:
    """``svd_error_mean`` / ``_max`` over all ranks and modules, and ``svd_error_r<r>_mean`` / ``_max`` per rank."""
    info = _summary("svd_error", [e for errs in errors.values() for e in errs])
    if per_rank and len(errors) > 1:
        for r in sorted(errors):
            info.update(_summary(f"svd_error_r{r}", errors[r]))
    return info
