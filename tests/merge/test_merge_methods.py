"""Each method against a hand computation on small tensors."""
from __future__ import annotations

import math

import pytest
import torch

from mira.errors import MiraError
from mira.merge import MergeMethod, MergeParams, get_method, method_names, register_method
from mira.merge.methods.dare import drop_and_rescale, stream_seed
from mira.merge.methods.slerp import slerp
from mira.merge.methods.ties import trim_to_density

T = torch.tensor


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"linear", "task_arithmetic", "ties", "dare", "slerp"} <= set(method_names())
    with pytest.raises(MiraError, match="unknown merge method 'soup'.*linear"):
        get_method("soup")


def test_registering_a_second_class_under_a_taken_name_fails():
    class Impostor(MergeMethod):
        name = "linear"

        def merge_tensor(self, tensors, weights, base, params):
            return tensors[0]

    with pytest.raises(ValueError, match="already registered"):
        register_method(Impostor)


def test_linear_normalises_the_weights():
    a, b = T([1.0, 2.0]), T([5.0, -2.0])
    linear = get_method("linear")
    assert torch.allclose(linear.merge_tensor([a, b], [1.0, 3.0], None, MergeParams()), T([4.0, -1.0]))
    raw = linear.merge_tensor([a, b], [1.0, 3.0], None, MergeParams(normalize=False))
    assert torch.allclose(raw, T([16.0, -4.0]))
    with pytest.raises(MiraError, match="sum of the weights"):
        linear.validate([1.0, -1.0], MergeParams())


def test_task_arithmetic_adds_scaled_task_vectors_to_the_base():
    base, a, b = T([1.0, 1.0]), T([2.0, 0.0]), T([1.0, 3.0])
    out = get_method("task_arithmetic").merge_tensor([a, b], [1.0, 0.5], base, MergeParams(lam=2.0))
    # tau_a = [1, -1], tau_b = [0, 2]; base + 2 * (tau_a + 0.5 tau_b) = [1 + 2, 1 + 0]
    assert torch.allclose(out, T([3.0, 1.0]))
    assert not torch.equal(a, base)  # inputs untouched


def test_ties_trims_elects_sign_and_takes_the_disjoint_mean():
    base = torch.ones(4)
    taus = [T([3.0, -2.0, 0.5, -1.0]), T([-1.0, -4.0, 2.0, 0.5]), T([2.0, 1.0, -3.0, 0.1])]
    # density 0.5 keeps 2 of 4:  [3,-2,0,0]  [0,-4,2,0]  [2,0,-3,0]
    assert torch.equal(trim_to_density(taus[0], 0.5), T([3.0, -2.0, 0.0, 0.0]))
    params = MergeParams(densities=(0.5, 0.5, 0.5))
    ties = get_method("ties")
    out = ties.merge_tensor([base + t for t in taus], [1.0, 1.0, 1.0], base, params)
    # sums [5, -6, -1, 0] -> signs [+, -, -, +]; agreeing means [2.5, -3, -3, (none) 0]
    assert torch.allclose(out, base + T([2.5, -3.0, -3.0, 0.0]))

    weighted = ties.merge_tensor([base + t for t in taus], [1.0, 2.0, 1.0], base, params)
    # weighted sums [5, -10, 1, 0] -> [+, -, +, +]: [(3+2)/2, (-2-8)/3, 2*2/2, 0]
    assert torch.allclose(weighted, base + T([2.5, -10.0 / 3.0, 2.0, 0.0]))

    summed = ties.merge_tensor([base + t for t in taus], [1.0, 1.0, 1.0], base,
                               MergeParams(densities=(0.5, 0.5, 0.5), normalize=False, lam=0.5))
    assert torch.allclose(summed, base + 0.5 * T([5.0, -6.0, -3.0, 0.0]))


def test_ties_without_base_treats_the_inputs_as_task_vectors():
    taus = [T([1.0, -1.0]), T([3.0, 2.0])]
    out = get_method("ties").merge_tensor(taus, [1.0, 1.0], None, MergeParams())
    assert torch.allclose(out, T([2.0, 2.0]))  # entry 1: sum +1 -> only the +2 agrees


def test_dare_drops_with_probability_p_and_keeps_the_expectation():
    tau = torch.full((200_000,), 3.0)
    generator = torch.Generator().manual_seed(stream_seed(7, "w", 0))
    sparse = drop_and_rescale(tau, 0.75, generator)
    kept = sparse != 0
    assert set(sparse.unique().tolist()) == {0.0, 12.0}  # survivors rescaled by 1 / (1 - p)
    assert abs(kept.float().mean().item() - 0.25) < 0.005
    assert abs(sparse.mean().item() - 3.0) < 0.05
    assert torch.equal(drop_and_rescale(tau, 0.0, generator), tau)


def test_dare_is_seeded_per_tensor_name_and_model():
    dare = get_method("dare")
    base, x = torch.zeros(1000), torch.randn(1000)
    params = MergeParams(name="layer.weight", densities=(0.5,), seed=3, rescale="inverse_density")
    first = dare.merge_tensor([x], [1.0], base, params)
    assert torch.equal(first, dare.merge_tensor([x], [1.0], base, params))
    other_name = MergeParams(name="other", densities=(0.5,), seed=3, rescale="inverse_density")
    other_seed = MergeParams(name="layer.weight", densities=(0.5,), seed=4, rescale="inverse_density")
    assert not torch.equal(first, dare.merge_tensor([x], [1.0], base, other_name))
    assert not torch.equal(first, dare.merge_tensor([x], [1.0], base, other_seed))
    kept = first != 0
    assert torch.allclose(first[kept], 2.0 * x[kept])


def test_dare_without_drops_reduces_to_task_arithmetic_or_ties():
    base = torch.ones(4)
    models = [base + T([3.0, -2.0, 0.5, -1.0]), base + T([-1.0, -4.0, 2.0, 0.5])]
    dare = get_method("dare")
    keep_all = MergeParams(densities=(1.0, 1.0), lam=0.5)
    assert torch.allclose(dare.merge_tensor(models, [1.0, 1.0], base, keep_all),
                          get_method("task_arithmetic").merge_tensor(models, [1.0, 1.0], base, keep_all))
    ties_combine = MergeParams(densities=(1.0, 1.0), combine="ties", normalize=True)  # mergekit: off by default
    assert torch.allclose(dare.merge_tensor(models, [1.0, 1.0], base, ties_combine),
                          get_method("ties").merge_tensor(models, [1.0, 1.0], base, MergeParams()))
    with pytest.raises(MiraError, match="drop_rate"):
        dare.validate([1.0, 1.0], MergeParams())


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    a, b = T([1.0, 0.0]), T([0.0, 2.0])
    assert torch.allclose(slerp(0.0, a, b), a)
    assert torch.allclose(slerp(1.0, a, b), b)
    # 90 degrees apart: sin(45 deg) / sin(90 deg) on each
    assert torch.allclose(slerp(0.5, a, b), T([math.sqrt(0.5), 2 * math.sqrt(0.5)]))
    parallel = T([2.0, 4.0])
    assert torch.allclose(slerp(0.25, T([1.0, 2.0]), parallel), T([1.25, 2.5]))  # linear fallback
    assert torch.allclose(slerp(0.5, T([1.0, 2.0]), -parallel), T([-0.5, -1.0]))
    assert torch.allclose(slerp(0.3, torch.zeros(2), b), 0.3 * b)
    method = get_method("slerp")
    assert method.num_models == 2
    assert torch.allclose(method.merge_tensor([a, b], [1.0, 1.0], None, MergeParams(t=1.0)), b)
