"""Clustering: identical models cluster, dissimilar ones do not, the threshold decides."""
from __future__ import annotations

from pathlib import Path

import torch

from mira.glue.similarity import (
    cluster,
    column_cosine,
    lora_deltas,
    similarity,
    similarity_matrix,
)
from mira.glue.zoo import Member


def adapter(seed: int, noise: float = 0.0, like: dict | None = None, rank: int = 4) -> Member:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(2):
        for mod in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            a, b = torch.randn(rank, 16, generator=g), torch.randn(16, rank, generator=g)
            if like is not None:
                a = like[f"{pre}.lora_A.weight"] + noise * a
                b = like[f"{pre}.lora_B.weight"] + noise * b
            state[f"{pre}.lora_A.weight"], state[f"{pre}.lora_B.weight"] = a, b
    return Member(f"m{seed}", Path("."), "adapter", state, model_type="llama+lora")


def test_column_cosine_basics():
    a = torch.randn(8, 5)
    assert abs(column_cosine(a, a) - 1.0) < 1e-6
    assert abs(column_cosine(a, -a) + 1.0) < 1e-6
    assert abs(column_cosine(a, 3 * a) - 1.0) < 1e-6  # scale-free
    assert column_cosine(torch.zeros(4, 3), torch.zeros(4, 3)) == 1.0


def test_lora_similarity_uses_delta_not_factors():
    m = adapter(0)
    # same delta B @ A with different factors (B R, R^-1 A) -> identical
    r = torch.linalg.qr(torch.randn(4, 4))[0]
    other = {}
    for k, v in m.state.items():
        other[k] = r.T @ v if ".lora_A." in k else v @ r
    twin = Member("twin", Path("."), "adapter", other, model_type="llama+lora")
    for k in lora_deltas(m.state):
        assert torch.allclose(lora_deltas(m.state)[k], lora_deltas(other)[k], atol=1e-4)
    assert similarity(m, twin) > 0.999


def test_identical_cluster_dissimilar_do_not():
    a = adapter(0)
    same = Member("same", Path("."), "adapter", {k: v.clone() for k, v in a.state.items()}, model_type="llama+lora")
    close = adapter(5, noise=0.05, like=a.state)
    far = adapter(1)
    members = [a, far, same, close]
    sim = similarity_matrix(members)
    assert sim[0][2] > 0.999 and sim[0][1] < 0.5
    assert cluster(members, 0.95, sim) == [[0, 2, 3], [1]]
    # the threshold decides: above every similarity -> all singletons; below all -> one cluster
    assert cluster(members, 1.0, sim) == [[0], [1], [2], [3]]
    assert cluster(members, -1.0, sim) == [[0, 1, 2, 3]]


def test_architecture_splits_clusters():
    a = adapter(0)
    b = adapter(0, rank=2)  # different shapes
    sim = similarity_matrix([a, b])
    assert sim[0][1] == -1.0
    assert cluster([a, b], -1.0, sim) == [[0], [1]]


def test_full_models_compare_task_vectors():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 16, generator=g) * 10, "norm": torch.ones(16)}
    d1, d2 = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    m1 = Member("m1", Path("."), "model", {"w": base["w"] + d1, "norm": torch.ones(16)}, model_type="llama")
    m2 = Member("m2", Path("."), "model", {"w": base["w"] + d2, "norm": torch.ones(16)}, model_type="llama")
    # weights dominated by the shared base look alike; task vectors do not
    assert similarity(m1, m2) > 0.95
    assert similarity(m1, m2, base) < 0.5
    assert cluster([m1, m2], 0.95, base=base) == [[0], [1]]


def test_similarity_uses_attention_and_mlp_weights_only():
    """Members that differ only in embeddings / lm_head are identical on attention and MLP weights."""
    g = torch.Generator().manual_seed(1)
    shared = {f"model.layers.0.{m}.weight": torch.randn(16, 16, generator=g)
              for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    m1 = Member("m1", Path("."), "model", {**shared, "model.embed_tokens.weight": torch.randn(40, 16, generator=g),
                                            "lm_head.weight": torch.randn(40, 16, generator=g)}, model_type="llama")
    m2 = Member("m2", Path("."), "model", {**shared, "model.embed_tokens.weight": torch.randn(40, 16, generator=g),
                                            "lm_head.weight": torch.randn(40, 16, generator=g)}, model_type="llama")
    assert abs(similarity(m1, m2) - 1.0) < 1e-6
    from mira.glue.similarity import comparable_matrices

    assert set(comparable_matrices(m1)) == set(shared)
