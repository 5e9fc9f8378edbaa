import numpy as np
import pytest
import torch

from mira.config import FederationConfig
from mira.errors import MiraError
from mira.federated.graph import build_graph, validate_graph
from mira.federated.strategies import STRATEGIES, FitRes, StrategyContext, get_strategy

KEYS = ["m.0.q.lora_A.weight", "m.0.q.lora_B.weight"]


def _ctx(k=4, lr=0.01, steps=5):
    return StrategyContext(num_clients=k, n_train=[10, 30, 20, 40][:k], lr=lr, local_steps=steps, seed=0, keys=KEYS)


def _state(v):
    return {KEYS[0]: torch.full((2, 3), float(v)), KEYS[1]: torch.full((3, 2), float(v) * 2)}


def _make(name, k=4, **params):
    cls = get_strategy(name)
    return cls(cls.parse_params(params), _ctx(k), _state(0))


def test_registry_has_all_algorithms():
    assert {"local", "fedit", "fedprox", "ffa_lora", "centralized", "mira"} <= set(STRATEGIES)
    with pytest.raises(MiraError, match="unknown algorithm 'fedsgd'"):
        get_strategy("fedsgd")


def test_fedit_weighted_average():
    s = _make("fedit")
    s.aggregate_fit(1, {0: FitRes(_state(1), 10), 1: FitRes(_state(4), 30)})
    expected = (1 * 10 + 4 * 30) / 40
    assert torch.allclose(s.adapter_for(3)[KEYS[0]], torch.full((2, 3), expected))
    assert s.configure_fit(2).adapter is s.adapter_for(0)


def test_fedprox_sends_mu_and_rejects_unknown_options():
    s = _make("fedprox", mu=0.5)
    assert s.configure_fit(0).prox_mu == 0.5
    with pytest.raises(MiraError, match="algorithm.lam"):
        _make("fedprox", lam=1)


def test_ffa_lora_freezes_and_sends_only_B():
    s = _make("ffa_lora")
    assert s.wire_keys() == [KEYS[1]]
    assert s.configure_fit(0).frozen == frozenset({KEYS[0]})


def test_local_keeps_each_clients_own_adapter():
    s = _make("local")
    s.aggregate_fit(1, {1: FitRes(_state(5), 30)})
    assert torch.equal(s.adapter_for(1)[KEYS[0]], _state(5)[KEYS[0]])
    assert torch.equal(s.adapter_for(0)[KEYS[0]], _state(0)[KEYS[0]])


def _manual_mira(stored, fresh, a, step, neighbours):
    out = {}
    for k, wk in fresh.items():
        out[k] = {}
        for key in KEYS:
            lap = sum(a[k, l] * (wk[key] - (fresh[l] if l in fresh else stored[l])[key])
                      for l in neighbours if l != k)
            out[k][key] = wk[key] - step * lap
    return out


@pytest.mark.parametrize("neighbors", ["all", "sampled"])
def test_mira_laplacian_step_matches_the_formula(neighbors, tmp_path):
    a = np.array([[0, 1, 0.5, 0.3], [1, 0, 0, 2], [0.5, 0, 0, 1], [0.3, 2, 1, 0]], dtype=float)
    np.save(tmp_path / "g.npy", a)
    s = _make("mira", graph="file", graph_file=str(tmp_path / "g.npy"), neighbors=neighbors, eta=0.1, **{"lambda": 0.5})
    stored = {k: _state(k + 1) for k in range(4)}
    s.adapters = {k: dict(v) for k, v in stored.items()}
    fresh = {0: _state(10), 3: _state(-2)}
    s.aggregate_fit(1, {k: FitRes(v, 10) for k, v in fresh.items()})
    expected = _manual_mira(stored, fresh, a, 0.05, range(4) if neighbors == "all" else sorted(fresh))
    for k in (0, 3):
        for key in KEYS:
            assert torch.allclose(s.adapter_for(k)[key], expected[k][key])
    # unsampled clients keep theirs; a sampled client starts next time from its regularised adapter
    assert torch.equal(s.adapter_for(1)[KEYS[0]], stored[1][KEYS[0]])
    assert s.configure_fit(0).adapter is s.adapter_for(0)
    assert not torch.equal(s.adapter_for(0)[KEYS[0]], fresh[0][KEYS[0]])
    np.testing.assert_array_equal(s.graphs[-1], a)


def test_mira_defaults_and_overshoot():
    s = _make("mira", graph="uniform")
    assert s.eta == pytest.approx(0.01 * 5) and s.p.lambda_ == 0.5
    with pytest.raises(MiraError, match="overshoot"):
        _make("mira", graph="uniform", eta=1.0, **{"lambda": 0.5})


def test_random_graph_as_in_the_paper():
    a = build_graph("random", 10, seed=1).a
    b = build_graph("random", 10, seed=1).a
    np.testing.assert_array_equal(a, b)
    assert np.allclose(a, a.T) and np.all(np.diag(a) == 0)
    off = a[~np.eye(10, dtype=bool)]
    assert np.all((off == 0) | (off >= 0.25)) and (off == 0).any() and (off > 0).any()


def test_graph_file_validation(tmp_path):
    bad = {"asym.npy": np.array([[0, 1], [2, 0.]]), "neg.npy": np.array([[0, -1], [-1, 0.]]),
           "diag.npy": np.array([[1, 1], [1, 0.]]), "shape.npy": np.zeros((2, 3))}
    for name, m in bad.items():
        np.save(tmp_path / name, m)
        with pytest.raises(MiraError, match="graph"):
            build_graph("file", 2, 0, str(tmp_path / name))
    with pytest.raises(MiraError, match="3x3 but there are 2 clients"):
        validate_graph(np.zeros((3, 3)), 2)
    with pytest.raises(MiraError, match="unknown graph"):
        build_graph("ring", 2, 0)


def test_similarity_graph_links_related_updates():
    g = build_graph("similarity", 3, 0)
    u = torch.tensor([1.0, 0.0, 1.0, 0.0])
    a = g.update({0: u, 1: 2 * u + 0.1, 2: torch.tensor([0.0, 1.0, 0.0, -1.0])})
    assert a[0, 1] > 0.95 and a[0, 2] == 0 and a[1, 2] == 0
    assert np.allclose(a, a.T) and np.all(np.diag(a) == 0)


def test_fraction_validation():
    with pytest.raises(Exception, match="fraction"):
        FederationConfig(fraction=0)
    with pytest.raises(Exception, match="fraction"):
        FederationConfig(fraction=1.5)
