"""The hidden-state router and the LoRA-level mixture's exact stacking."""
from __future__ import annotations

import numpy as np
import torch

from mira.glue.lora_mixture import stack_experts
from mira.glue.router import HiddenRouter, best_expert, routed_losses


def features(seed: int = 0, n_per: int = 10, experts: int = 3, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(experts, dim, generator=g) * 3
    x = torch.cat([centres[e] + 0.5 * torch.randn(n_per, dim, generator=g) for e in range(experts)])
    owners = [e for e in range(experts) for _ in range(n_per)]
    return x, owners


def test_router_init_routes_own_prompts_to_their_member():
    x, owners = features()
    router = HiddenRouter.from_features(x, owners, 3)
    assert router.route(x) == owners
    w = router.weights(x)
    assert torch.allclose(w.sum(-1), torch.ones(len(owners)))
    assert (w.argmax(-1).tolist()) == owners


def test_router_fit_lowers_loss_towards_targets():
    x, owners = features(1)
    router = HiddenRouter.from_features(x, owners, 3)
    targets = [(o + 1) % 3 for o in owners]  # deliberately different from the init
    history = router.fit(x, targets, steps=60, lr=0.2)
    assert history[-1] < history[0]
    assert np.mean([r == t for r, t in zip(router.route(x), targets)]) > 0.8


def test_routed_losses_and_targets():
    nll = np.array([[1.0, 2.0], [4.0, 3.0]])
    tokens = np.array([2.0, 1.0])
    assert best_expert(nll, tokens) == [0, 1]
    assert routed_losses(nll, tokens, [1, 0]).tolist() == [2.0, 4.0]


def test_stacked_lora_equals_weighted_sum_of_deltas():
    g = torch.Generator().manual_seed(0)
    key = "base_model.model.layer.q_proj"
    states = [{f"{key}.lora_A.weight": torch.randn(4, 8, generator=g),
               f"{key}.lora_B.weight": torch.randn(8, 4, generator=g)} for _ in range(3)]
    w, scales, s = [0.5, 0.2, 0.3], [2.0, 2.0, 2.0], 1.0
    mix = stack_experts(states, w, scales, s)
    got = s * mix[f"{key}.lora_B.weight"] @ mix[f"{key}.lora_A.weight"]
    want = sum(wi * si * st[f"{key}.lora_B.weight"] @ st[f"{key}.lora_A.weight"]
               for wi, si, st in zip(w, scales, states))
    assert torch.allclose(got, want, atol=1e-5)
