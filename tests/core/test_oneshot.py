import copy
import random

import torch

from mira.config import validate
from mira.federated.engine import Engine, Workspace
from mira.federated.strategies import FitRes, StrategyContext, get_strategy


def test_oneshot_trains_the_whole_budget_and_communicates_once(tiny_cfg, tmp_path):
    raw = copy.deepcopy(tiny_cfg)
    raw["federation"].update(rounds=3, local_steps=2)
    raw["algorithm"] = {"name": "oneshot"}
    cfg = validate(raw)
    ws = Workspace.load(cfg)
    s = Engine(ws, cfg, tmp_path / "one").run()
    assert s["rounds"] == 1 and s["train_steps"] == 4 * 3 * 2
    assert s["bytes_up"] == s["bytes_down"] == 4 * (16 + s["adapter_bytes"])  # one message per client each way
    raw["algorithm"] = {"name": "fedit"}
    fed = Engine(ws, validate(raw), tmp_path / "fedit").run()
    assert fed["train_steps"] == s["train_steps"]
    assert fed["bytes_up"] == 3 * s["bytes_up"]


def test_oneshot_merge_does_not_depend_on_arrival_order():
    keys = ["a.lora_A.weight", "a.lora_B.weight"]
    ctx = StrategyContext(num_clients=5, n_train=[3, 1, 4, 1, 5], lr=0.1, local_steps=1, seed=0, keys=keys, rounds=2)
    cls = get_strategy("oneshot")
    gen = torch.Generator().manual_seed(0)
    results = {c: FitRes({k: torch.randn(7, 3, generator=gen) for k in keys}, n) for c, n in enumerate(ctx.n_train)}
    merged = []
    for seed in range(4):
        order = list(results)
        random.Random(seed).shuffle(order)
        s = cls(cls.parse_params({}), ctx, {k: torch.zeros(7, 3) for k in keys})
        assert s.configure_fit(0).step_scale == 2 and s.num_rounds(10) == 1
        s.aggregate_fit(1, {c: results[c] for c in order})
        merged.append(s.adapter_for(0))
    for m in merged[1:]:
        assert all(torch.equal(m[k], merged[0][k]) for k in keys)
    expected = sum(results[c].adapter[keys[0]] * n for c, n in enumerate(ctx.n_train)) / sum(ctx.n_train)
    assert torch.allclose(merged[0][keys[0]], expected, atol=1e-6)


def test_oneshot_with_a_merge_method(tiny_cfg, tmp_path):
    raw = copy.deepcopy(tiny_cfg)
    raw["algorithm"] = {"name": "oneshot", "merge": "ties", "merge_params": {"density": 0.5}}
    cfg = validate(raw)
    eng = Engine(Workspace.load(cfg), cfg, tmp_path)
    s = eng.run()
    assert s["rounds"] == 1
    init = eng.ws.slot.initial_state
    b_keys = [k for k in init if ".lora_B." in k]
    # TIES trims each task vector to half its entries: some B entries stay exactly at the init (0)
    merged = eng.strategy.adapter_for(0)
    assert any((merged[k] == 0).any() for k in b_keys) and any((merged[k] != 0).any() for k in b_keys)


def _oneshot_merge(merge: str, n_train: list[int], updates: list[dict], init: dict, **merge_params) -> dict:
    keys = list(init)
    ctx = StrategyContext(num_clients=len(n_train), n_train=n_train, lr=0.1, local_steps=1, seed=0, keys=keys,
                          rounds=1)
    cls = get_strategy("oneshot")
    s = cls(cls.parse_params({"merge": merge, "merge_params": merge_params} if merge_params else {"merge": merge}),
            ctx, init)
    s.aggregate_fit(1, {c: FitRes({k: init[k] + u[k] for k in keys}, n) for c, (u, n) in
                        enumerate(zip(updates, n_train))})
    return s.adapter_for(0)


def test_oneshot_task_arithmetic_averages_the_updates_instead_of_summing_them():
    """Raw example counts as weights scaled the update by their sum (400x here); proportions average it."""
    keys = ["a.lora_A.weight", "a.lora_B.weight"]
    gen = torch.Generator().manual_seed(1)
    init = {k: torch.randn(6, 4, generator=gen) for k in keys}
    n_train = [100, 50, 150, 100]
    direction = {k: torch.randn(6, 4, generator=gen) for k in keys}
    scales = [0.5, 1.0, 2.0, 1.5]  # updates along one direction: the average's norm lies between theirs
    updates = [{k: s * direction[k] for k in keys} for s in scales]

    def norm(state: dict) -> float:
        return float(torch.sqrt(sum((state[k] - init[k]).pow(2).sum() for k in keys)))

    client_norms = [norm({k: init[k] + u[k] for k in keys}) for u in updates]
    merged = _oneshot_merge("task_arithmetic", n_train, updates, init)
    assert min(client_norms) <= norm(merged) <= max(client_norms)
    linear = _oneshot_merge("linear", n_train, updates, init)
    assert all(torch.allclose(merged[k], linear[k], atol=1e-6) for k in keys)
    # any updates: the merged one is the data-weighted average of the clients'
    updates = [{k: torch.randn(6, 4, generator=gen) for k in keys} for _ in n_train]
    merged = _oneshot_merge("task_arithmetic", n_train, updates, init)
    expected = {k: init[k] + sum(u[k] * n for u, n in zip(updates, n_train)) / sum(n_train) for k in keys}
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in keys)
    assert norm(merged) <= max(norm({k: init[k] + u[k] for k in keys}) for u in updates)
    # dare (which sums task vectors too) stays at the scale of one client's update, not 400 of them
    dare = _oneshot_merge("dare", n_train, updates, init, density=0.5, rescale="inverse_density")
    assert norm(dare) < 3 * max(norm({k: init[k] + u[k] for k in keys}) for u in updates)
