"""Which zoo members can be merged: group by architecture, then by weight similarity.

Similarity of two members is the mean, over their weight matrices, of the per-column
cosine similarity (Model-GLUE): for each matrix, the cosine between column ``j`` of one
model and column ``j`` of the other, averaged over columns. It is computed on task vectors
(``theta - theta_base``) when a base is given, and for LoRA adapters on each module's
delta ``B @ A`` (the scale ``alpha / r`` does not change a cosine).

A member joins the first cluster whose *first* member it resembles above ``threshold``;
otherwise it starts a new cluster. Members of different architectures never share one.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mira.glue.zoo import Member


def column_cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> float:
    """Mean over columns of the cosine similarity between ``a[:, j]`` and ``b[:, j]``.

    Two all-zero columns count as identical (1); one zero column against a non-zero one as 0.
    """
    a, b = a.float().reshape(a.shape[0], -1), b.float().reshape(b.shape[0], -1)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    cos = (a * b).sum(0) / (na * nb).clamp_min(eps)
    both_zero = (na <= eps) & (nb <= eps)
    cos = torch.where(both_zero, torch.ones_like(cos), cos)
    return float(cos.mean())


def lora_deltas(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{module: B @ A}`` for every LoRA module of a PEFT adapter state."""
    out = {}
    for key, a in state.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            out[module] = b.float() @ a.float()
    return out


def comparable_matrices(member: Member, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The matrices a member is compared on: LoRA deltas, task vectors, or its 2-D weights."""
    if member.kind == "adapter":
        return lora_deltas(member.state)
    out = {}
    for key, t in member.state.items():
        if t.dim() != 2:
            continue
        out[key] = t.float() - base[key].float() if base is not None and key in base else t.float()
    return out


def similarity(a: Member, b: Member, base: Mapping[str, Tensor] | None = None) -> float:
    """Mean per-column cosine similarity over the shared weight matrices (-1..1); -1 if none are shared."""
    ma, mb = comparable_matrices(a, base), comparable_matrices(b, base)
    keys = [k for k in ma if k in mb and ma[k].shape == mb[k].shape]
    if not keys:
        return -1.0
    return sum(column_cosine(ma[k], mb[k]) for k in keys) / len(keys)


def similarity_matrix(members: Sequence[Member], base: Mapping[str, Tensor] | None = None) -> list[list[float]]:
    """Pairwise ``similarity``; members of different architectures get -1."""
    mats = [comparable_matrices(m, base) for m in members]
    n = len(members)
    out = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if members[i].signature != members[j].signature:
                s = -1.0
            else:
                keys = [k for k in mats[i] if k in mats[j]]
                s = sum(column_cosine(mats[i][k], mats[j][k]) for k in keys) / len(keys) if keys else -1.0
            out[i][j] = out[j][i] = s
    return out


def cluster(members: Sequence[Member], threshold: float = 0.95,
            sim: Sequence[Sequence[float]] | None = None,
            base: Mapping[str, Tensor] | None = None) -> list[list[int]]:
    """Clusters of member indices, in zoo order.

    Members are first grouped by architecture (``Member.signature``); inside a group a member
    joins the first cluster whose first member has similarity above ``threshold`` to it.
    """
    sim = sim if sim is not None else similarity_matrix(members, base)
    clusters: list[list[int]] = []
    for i, m in enumerate(members):
        for c in clusters:
            first = c[0]
            if members[first].signature == m.signature and sim[first][i] > threshold:
                c.append(i)
                break
        else:
            clusters.append([i])
    return clusters
