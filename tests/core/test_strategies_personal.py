"""Personalised baselines: ``fedsa_lora`` (shared A, local B) and ``fedit_ft`` (FedIT, then
local fine-tuning), server steps against hand computations."""
import pytest
import torch

from mira.errors import MiraError
from mira.federated.strategies import FitRes, StrategyContext, get_strategy

KEYS = ["m.0.q.lora_A.weight", "m.0.q.lora_B.weight"]


def _ctx(k=3, rounds=2, steps=5):
    return StrategyContext(num_clients=k, n_train=[10, 30, 20][:k], lr=0.01, local_steps=steps, seed=0, keys=KEYS,
                           rounds=rounds)


def _state(a, b):
    return {KEYS[0]: torch.full((2, 3), float(a)), KEYS[1]: torch.full((3, 2), float(b))}


def _make(name, ctx=None, **params):
    cls = get_strategy(name)
    return cls(cls.parse_params(params), ctx or _ctx(), _state(1, 0))


def _val(s, cid, key):
    return s.adapter_for(cid)[key][0, 0].item()


def test_fedsa_lora_averages_A_and_keeps_each_clients_B():
    s = _make("fedsa_lora")
    assert s.personalized and s.wire_keys() == KEYS
    s.aggregate_fit(1, {0: FitRes(_state(2, 5), 10), 2: FitRes(_state(4, -1), 20)})
    a = (2 * 10 + 4 * 20) / 30
    assert [_val(s, c, KEYS[0]) for c in range(3)] == pytest.approx([a, a, a])
    assert [_val(s, c, KEYS[1]) for c in range(3)] == pytest.approx([5, 0, -1])  # client 1: still the init's B
    # a client starts from the shared A and its own B
    ins = s.configure_fit(2)
    assert ins.adapter is s.adapter_for(2) and ins.adapter[KEYS[1]][0, 0].item() == -1
    assert list(ins.adapter) == KEYS
    s.aggregate_fit(2, {1: FitRes(_state(0, 7), 30)})
    assert [_val(s, c, KEYS[0]) for c in range(3)] == pytest.approx([0, 0, 0])
    assert [_val(s, c, KEYS[1]) for c in range(3)] == pytest.approx([5, 7, -1])
    # the adapters are distinct, persistent objects (the engine tells them apart by identity)
    assert len({id(s.adapter_for(c)) for c in range(3)}) == 3 and s.adapter_for(0) is s.adapter_for(0)
    t = _make("fedsa_lora")
    t.load_state_dict(s.state_dict())
    assert all(torch.equal(t.adapter_for(c)[k], s.adapter_for(c)[k]) for c in range(3) for k in KEYS)


def test_fedit_ft_trains_fedit_then_every_client_finetunes():
    s = _make("fedit_ft", ctx=_ctx(rounds=2))
    assert s.num_rounds(2) == 3 and s.personalized and s.scale == 1
    assert s.select_clients(1, [0, 2]) == [0, 2] and s.select_clients(3, [1]) == [0, 1, 2]
    s.aggregate_fit(1, {0: FitRes(_state(2, 2), 10), 1: FitRes(_state(4, 4), 30)})
    assert _val(s, 2, KEYS[0]) == pytest.approx(3.5)  # FedIT: (2*10 + 4*30) / 40
    assert s.configure_fit(0).step_scale == 1 and s.configure_fit(0).adapter is s.global_adapter
    s.aggregate_fit(2, {1: FitRes(_state(6, 6), 30)})
    g = s.global_adapter
    assert _val(s, 0, KEYS[0]) == pytest.approx(6) and all(s.adapter_for(c) is g for c in range(3))
    ins = s.configure_fit(1)  # round 3: fine-tuning from the final global adapter
    assert ins.adapter is g and ins.step_scale == 1
    info = s.aggregate_fit(3, {0: FitRes(_state(7, 1), 10), 2: FitRes(_state(8, 2), 20)})  # client 1 rejected
    assert info == {"finetuned_clients": [0, 2]}
    assert [_val(s, c, KEYS[0]) for c in range(3)] == pytest.approx([7, 6, 8])
    assert s.global_adapter is g  # nothing aggregated
    t = _make("fedit_ft", ctx=_ctx(rounds=2))
    t.load_state_dict(s.state_dict())
    assert t.done == 3 and [_val(t, c, KEYS[0]) for c in range(3)] == pytest.approx([7, 6, 8])


def test_fedit_ft_resumes_between_the_last_round_and_finetuning():
    s = _make("fedit_ft", ctx=_ctx(rounds=1), finetune_steps=10)
    s.aggregate_fit(1, {0: FitRes(_state(2, 2), 10)})
    t = _make("fedit_ft", ctx=_ctx(rounds=1), finetune_steps=10)
    t.load_state_dict(s.state_dict())
    assert t.configure_fit(0).step_scale == 2 and t.configure_fit(0).adapter[KEYS[0]][0, 0].item() == 2


def test_fedit_ft_finetune_steps_must_be_a_multiple_of_R():
    with pytest.raises(MiraError, match="not a multiple"):
        _make("fedit_ft", finetune_steps=7)
    cls = get_strategy("fedit_ft")  # also refused up front (mira compare / mira tune call check_setup first)
    with pytest.raises(MiraError, match="not a multiple"):
        cls.check_setup(cls.parse_params({"finetune_steps": 7}), _ctx())
    cls.check_setup(cls.parse_params({"finetune_steps": 15}), _ctx())
    with pytest.raises(MiraError, match="algorithm.finetune_steps"):
        get_strategy("fedit_ft").parse_params({"finetune_steps": 0})
