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
