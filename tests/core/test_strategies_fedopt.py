"""FedOpt family (fedavgm, fedadam, fedyogi, fedadagrad): server steps against hand computations.

Sign convention: Delta = (weighted mean of uploads) - global; x <- x + lr_t * step(Delta)."""
import math

import pytest
import torch

from mira.errors import MiraError
from mira.federated.strategies import FitRes, StrategyContext, get_strategy

KEYS = ["m.0.q.lora_A.weight", "m.0.q.lora_B.weight"]


def _ctx():
    return StrategyContext(num_clients=2, n_train=[10, 30], lr=0.01, local_steps=5, seed=0, keys=KEYS)


def _state(a, b):
    return {KEYS[0]: torch.full((2, 3), float(a), dtype=torch.float64),
            KEYS[1]: torch.full((3, 2), float(b), dtype=torch.float64)}


def _make(name, **params):
    cls = get_strategy(name)
    return cls(cls.parse_params(params), _ctx(), _state(0, 0))


# the uploads of three rounds: (client 0 with n=10, client 1 with n=30); means 3.25, 2.0, -0.5 for A
ROUNDS = [((1.0, 4.0), (0.0, 0.0)), ((2.0, 2.0), (1.0, 3.0)), ((-2.0, 0.0), (0.5, 0.5))]


def _run(s):
    for rnd, ((a0, a1), (b0, b1)) in enumerate(ROUNDS, 1):
        info = s.aggregate_fit(rnd, {0: FitRes(_state(a0, b0), 10), 1: FitRes(_state(a1, b1), 30)})
    return info


def _means(i):
    return [0.25 * u + 0.75 * w for u, w in ROUNDS[i]]


def _reference(update):
    """Scalar reference: per key, x_t from the hand-written ``update(state, delta, t) -> step``."""
    out = []
    for key in range(2):
        x, st = 0.0, {"m": 0.0, "v": 0.0}
        for t in range(1, len(ROUNDS) + 1):
            delta = _means(t - 1)[key] - x
            x += update(st, delta, t)
        out.append(x)
    return out


def _check(s, expected):
    for key, x in zip(KEYS, expected):
        assert torch.allclose(s.adapter_for(0)[key], torch.full_like(s.adapter_for(0)[key], x), rtol=1e-12, atol=1e-12)


def test_fedadam_first_step_is_lr_times_sign_and_matches_adam():
    s = _make("fedadam")
    assert (s.p.server_lr, s.p.beta1, s.p.beta2, s.p.tau) == (0.1, 0.9, 0.99, 1e-9)  # Flower's defaults
    s.aggregate_fit(1, {0: FitRes(_state(1, 0), 10), 1: FitRes(_state(4, 0), 30)})
    # Delta = 3.25; m = 0.325; v = 0.01 * 3.25^2; lr_1 = 0.1 * sqrt(0.01) / 0.1 = 0.1 -> x = 0.1 * 0.325 / (0.325 + tau)
    assert s.adapter_for(0)[KEYS[0]][0, 0].item() == pytest.approx(0.1 * 0.325 / (0.325 + 1e-9), abs=1e-15)
    assert torch.equal(s.adapter_for(0)[KEYS[1]], torch.zeros(3, 2, dtype=torch.float64))  # Delta = 0 there
    s = _make("fedadam", server_lr=0.3, beta1=0.8, beta2=0.95, tau=1e-3)

    def adam(st, d, t):
        st["m"] = 0.8 * st["m"] + 0.2 * d
        st["v"] = 0.95 * st["v"] + 0.05 * d * d
        lr = 0.3 * math.sqrt(1 - 0.95 ** t) / (1 - 0.8 ** t)
        return lr * st["m"] / (math.sqrt(st["v"]) + 1e-3)

    info = _run(s)
    _check(s, _reference(adam))
    assert s.t == 3 and info["server_lr"] == pytest.approx(0.3 * math.sqrt(1 - 0.95 ** 3) / (1 - 0.8 ** 3))


def test_fedadam_without_bias_correction_is_the_papers_algorithm():
    s = _make("fedadam", bias_correction=False, tau=0.01)

    def adam(st, d, t):
        st["m"] = 0.9 * st["m"] + 0.1 * d
        st["v"] = 0.99 * st["v"] + 0.01 * d * d
        return 0.1 * st["m"] / (math.sqrt(st["v"]) + 0.01)

    _run(s)
    _check(s, _reference(adam))


def test_fedyogi():
    s = _make("fedyogi")
    assert (s.p.server_lr, s.p.beta1, s.p.beta2, s.p.tau) == (0.01, 0.9, 0.99, 1e-3)

    def yogi(st, d, t):
        st["m"] = 0.9 * st["m"] + 0.1 * d
        sign = (st["v"] > d * d) - (st["v"] < d * d)
        st["v"] = st["v"] - 0.01 * d * d * sign
        return 0.01 * st["m"] / (math.sqrt(st["v"]) + 1e-3)

    _run(s)
    _check(s, _reference(yogi))


def test_fedadagrad():
    s = _make("fedadagrad")
    assert (s.p.server_lr, s.p.beta1, s.p.tau) == (0.1, 0.0, 1e-9)

    def adagrad(st, d, t):
        st["v"] += d * d
        return 0.1 * d / (math.sqrt(st["v"]) + 1e-9)

    _run(s)
    _check(s, _reference(adagrad))
    s = _make("fedadagrad", beta1=0.5, tau=0.1, server_lr=1.0)

    def adagrad_m(st, d, t):
        st["m"] = 0.5 * st["m"] + 0.5 * d
        st["v"] += d * d
        return st["m"] / (math.sqrt(st["v"]) + 0.1)

    _run(s)
    _check(s, _reference(adagrad_m))
    with pytest.raises(MiraError, match="algorithm.beta2"):
        _make("fedadagrad", beta2=0.9)


def test_fedavgm():
    s = _make("fedavgm")
    assert (s.p.server_lr, s.p.momentum) == (1.0, 0.9)

    def sgdm(st, d, t):
        st["m"] = 0.9 * st["m"] + d
        return 1.0 * st["m"]

    _run(s)
    _check(s, _reference(sgdm))
    # round 1 by hand: x = Delta = the FedAvg mean; round 2: v = 0.9 * 3.25 + (2 - 3.25) = 1.675
    s = _make("fedavgm")
    s.aggregate_fit(1, {0: FitRes(_state(1, 0), 10), 1: FitRes(_state(4, 0), 30)})
    assert s.adapter_for(0)[KEYS[0]][0, 0].item() == pytest.approx(3.25)
    s.aggregate_fit(2, {0: FitRes(_state(2, 0), 10), 1: FitRes(_state(2, 0), 30)})
    assert s.adapter_for(0)[KEYS[0]][0, 0].item() == pytest.approx(3.25 + 1.675)
    # momentum 0 and server_lr 1 is FedAvg
    s, f = _make("fedavgm", momentum=0.0), _make("fedit")
    _run(s), _run(f)
    _check(s, [f.adapter_for(0)[k][0, 0].item() for k in KEYS])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_state_round_trip_and_empty_round(name):
    a, b = _make(name), _make(name)
    a.aggregate_fit(1, {0: FitRes(_state(1, 2), 10), 1: FitRes(_state(4, -1), 30)})
    before = {k: v.clone() for k, v in a.adapter_for(0).items()}
    assert a.aggregate_fit(2, {}) == {} and a.t == 1  # all updates rejected: no server step
    assert all(torch.equal(before[k], a.adapter_for(0)[k]) for k in KEYS)
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.aggregate_fit(3, {0: FitRes(_state(0.5, 2), 10), 1: FitRes(_state(3, 0), 30)})
    assert all(torch.equal(a.adapter_for(0)[k], b.adapter_for(0)[k]) for k in KEYS)


@pytest.mark.parametrize("name,bad", [("fedadam", {"beta1": 1.0}), ("fedyogi", {"tau": 0}),
                                      ("fedavgm", {"momentum": -0.1}), ("fedadam", {"server_lr": 0}),
                                      ("fedadam", {"aggregation": "exact"})])
def test_fedopt_params_are_validated(name, bad):
    with pytest.raises(MiraError, match=f"algorithm.{next(iter(bad))}"):
        get_strategy(name).parse_params(bad)
