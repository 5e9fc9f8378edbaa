"""``fedit``'s aggregation of LoRA factors: the FedAvg error it reports, and ``aggregation: exact``
(average of the products B_k A_k, re-factored to rank r by truncated SVD), against dense
hand computations on 2 clients with tiny random matrices."""
import pytest
import torch

from mira.errors import MiraError
from mira.federated.strategies import FitRes, StrategyContext, get_strategy

A0, B0 = "base_model.model.l.0.q.lora_A.weight", "base_model.model.l.0.q.lora_B.weight"
A1, B1 = "base_model.model.l.0.v.lora_A.weight", "base_model.model.l.0.v.lora_B.weight"
KEYS = [A0, B0, A1, B1]
R, OUT, IN = 3, 6, 5
N = [10, 30]
W = [0.25, 0.75]


def _make(name="fedit", **params):
    cls = get_strategy(name)
    ctx = StrategyContext(num_clients=2, n_train=N, lr=0.01, local_steps=5, seed=0, keys=KEYS)
    init = {k: torch.zeros(R, IN) if ".lora_A." in k else torch.zeros(OUT, R) for k in KEYS}
    return cls(cls.parse_params(params), ctx, init)


def _uploads(seed=0, low_rank=False):
    g = torch.Generator().manual_seed(seed)
    ups = []
    for _ in range(2):
        s = {}
        for a, b in ((A0, B0), (A1, B1)):
            s[a] = torch.randn(R, IN, generator=g, dtype=torch.float64)
            if low_rank:  # B_k = u v^T: each product has rank 1, the stacked rank is <= 2 <= R
                u, v = (torch.randn(n, 1, generator=g, dtype=torch.float64) for n in (OUT, R))
                s[b] = u @ v.T
            else:
                s[b] = torch.randn(OUT, R, generator=g, dtype=torch.float64)
        ups.append(s)
    return ups


def _results(ups):
    return {i: FitRes(u, n) for i, (u, n) in enumerate(zip(ups, N))}


def _dense(ups, a, b):
    exact = sum(w * u[b] @ u[a] for u, w in zip(ups, W))
    fedavg = sum(w * u[b] for u, w in zip(ups, W)) @ sum(w * u[a] for u, w in zip(ups, W))
    return exact, fedavg


def test_fedavg_default_is_unchanged_and_reports_its_error():
    s = _make()
    assert s.p.aggregation == "fedavg"
    ups = _uploads()
    info = s.aggregate_fit(1, _results(ups))
    for k in KEYS:  # today's behaviour: tensor-by-tensor weighted mean
        assert torch.allclose(s.adapter_for(0)[k], W[0] * ups[0][k] + W[1] * ups[1][k])
    errs = []
    for a, b in ((A0, B0), (A1, B1)):
        exact, fedavg = _dense(ups, a, b)
        errs.append((torch.linalg.norm(fedavg - exact) / torch.linalg.norm(exact)).item())
    assert info["fedavg_error_mean"] == pytest.approx(sum(errs) / 2, rel=1e-9)
    assert info["fedavg_error_max"] == pytest.approx(max(errs), rel=1e-9)
    assert 0.05 < info["fedavg_error_mean"] and "svd_error_mean" not in info


def test_fedavg_error_is_zero_when_the_clients_agree():
    ups = _uploads()
    info = _make().aggregate_fit(1, _results([ups[0], ups[0]]))
    assert info["fedavg_error_max"] == pytest.approx(0, abs=1e-7)


def test_exact_is_the_truncated_svd_of_the_average_product():
    s = _make(aggregation="exact")
    ups = _uploads(1)
    info = s.aggregate_fit(1, _results(ups))
    g = s.adapter_for(0)
    errs = []
    for a, b in ((A0, B0), (A1, B1)):
        exact, _ = _dense(ups, a, b)
        u, sv, vh = torch.linalg.svd(exact)
        best = u[:, :R] @ torch.diag(sv[:R]) @ vh[:R]  # Eckart-Young: the best rank-R approximation
        assert g[a].shape == (R, IN) and g[b].shape == (OUT, R) and g[a].dtype == torch.float64
        assert torch.allclose(g[b] @ g[a], best, atol=1e-10)
        # singular values split symmetrically: B^T B = A A^T = diag(S_R)
        assert torch.allclose(g[b].T @ g[b], torch.diag(sv[:R]), atol=1e-10)
        assert torch.allclose(g[a] @ g[a].T, torch.diag(sv[:R]), atol=1e-10)
        errs.append((torch.linalg.norm(exact - best) / torch.linalg.norm(exact)).item())
    assert info["svd_error_mean"] == pytest.approx(sum(errs) / 2, rel=1e-7)
    assert info["svd_error_max"] == pytest.approx(max(errs), rel=1e-7)
    assert info["svd_error_max"] > 0.01  # stacked rank 2R > R: truncation loses something
    assert "fedavg_error_mean" in info  # what FedAvg would have made of the same uploads, for reference
    assert info["svd_error_max"] <= info["fedavg_error_max"]  # Eckart-Young: mean(B) mean(A) has rank <= R too


def test_exact_with_rank_at_least_the_stacked_rank_is_exact():
    s = _make(aggregation="exact")
    ups = _uploads(2, low_rank=True)
    info = s.aggregate_fit(1, _results(ups))
    g = s.adapter_for(0)
    for a, b in ((A0, B0), (A1, B1)):
        exact, fedavg = _dense(ups, a, b)
        assert torch.allclose(g[b] @ g[a], exact, atol=1e-12)
        assert not torch.allclose(fedavg, exact, atol=1e-3)
    assert info["svd_error_max"] == pytest.approx(0, abs=1e-12)
    assert info["fedavg_error_mean"] > 0.01


def test_exact_pads_with_zeros_and_keeps_float32():
    s = _make(aggregation="exact")
    ups = [{k: v.float() for k, v in u.items()} for u in _uploads(3)]
    s.aggregate_fit(1, _results([ups[0], ups[0]]))  # rank of the average = R exactly
    g = s.adapter_for(0)
    assert g[A0].dtype == torch.float32
    assert torch.allclose(g[B0] @ g[A0], ups[0][B0] @ ups[0][A0], atol=1e-5)


def test_aggregation_option_is_validated_and_not_inherited_where_meaningless():
    with pytest.raises(MiraError, match="algorithm.aggregation"):
        _make(aggregation="svd")
    for name in ("ffa_lora", "centralized"):
        with pytest.raises(MiraError, match="unknown option"):
            get_strategy(name).parse_params({"aggregation": "exact"})
    assert get_strategy("fedit_ft").parse_params({"aggregation": "exact"}).aggregation == "exact"


def test_product_norm_uses_the_smaller_of_the_gram_and_the_product():
    """||x @ y||_F^2 is exact either way; with a stacked rank above the layer's size the Gram
    matrices (R x R) would be the larger (quadratic memory in K * r), so the product is formed."""
    import torch

    from mira.federated.strategies.products import _prod_sq_norm

    g = torch.Generator().manual_seed(0)
    for out, r, inn in ((64, 16, 48), (8, 300, 6)):  # Gram path, product path
        x = torch.randn(out, r, generator=g, dtype=torch.float64)
        y = torch.randn(r, inn, generator=g, dtype=torch.float64)
        assert _prod_sq_norm(x, y) == pytest.approx(float((x @ y).pow(2).sum()), rel=1e-12)
