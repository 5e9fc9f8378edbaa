"""Which zoo members can be merged: group by architecture, then by weight similarity.

Similarity of two members is the mean, over their weight matrices, of the per-column
cosine similarity (Model-GLUE): for each matrix, the cosine between column ``j`` of one
model and column ``j`` of the other, averaged over columns. It is computed on task vectors
(``theta - theta_base``) when a base is given, and for LoRA adapters on each module's
delta ``B @ A`` (the scale ``alpha / r`` does not change a cosine). As in Model-GLUE, only
attention and MLP matrices count (``ATTN_MLP``: no embeddings, ``lm_head`` or norms).

A member joins the first cluster whose *first* member it resembles above ``threshold``;
otherwise it starts a new cluster. Members of different architectures never share one.
"""
from __future__ import annotations

import re
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


ATTN_MLP = re.compile(r"(^|\.)(self_attn|attn|attention|mlp|ffn|feed_forward|block_sparse_moe)(\.|$)"
                      r"|(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj"
                      r"|c_attn|c_proj|c_fc|query_key_value|dense_h_to_4h|dense_4h_to_h|fc1|fc2|wq|wk|wv|wo|w1|w2|w3)"
                      r"(\.|$)")
"""Names of attention and MLP weights (Model-GLUE compares models on these only: no embeddings,
``lm_head`` or norms)."""


def is_attention_or_mlp(name: str) -> bool:
    return bool(ATTN_MLP.search(name))


def matrices_of(kind: str, state: Mapping[str, Tensor], base: Mapping[str, Tensor] | None = None
                ) -> dict[str, Tensor]:
    """The matrices a state is compared on: LoRA deltas, task vectors, or its 2-D weights --
    attention and MLP ones only (all of them if none has such a name)."""
    if kind == "adapter":
        out = lora_deltas(state)
    else:
        out = {}
        for key, t in state.items():
            if t.dim() != 2:
                continue
            out[key] = t.float() - base[key].float() if base is not None and key in base else t.float()
    kept = {k: v for k, v in out.items() if is_attention_or_mlp(k)}
    return kept or out


def comparable_matrices(member: Member, base: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The matrices a member is compared on (``matrices_of``)."""
    return matrices_of(member.kind, member.state, base)


def matrices_similarity(ma: Mapping[str, Tensor], mb: Mapping[str, Tensor]) -> float:
    """Mean per-column cosine over the matrices both have with the same shape; -1 if none."""
    keys = [k for k in ma if k in mb and ma[k].shape == mb[k].shape]
    if not keys:
        return -1.0
    return sum(column_cosine(ma[k], mb[k]) for k in keys) / len(keys)


def similarity(a: Member, b: Member, base: Mapping[str, Tensor] | None = None) -> float:
    """Mean per-column cosine similarity over the shared attention/MLP matrices (-1..1); -1 if none are shared."""
    return matrices_similarity(comparable_matrices(a, base), comparable_matrices(b, base))


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
                s = matrices_similarity(mats[i], mats[j])
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
