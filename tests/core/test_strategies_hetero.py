"""Heterogeneous LoRA ranks (``lora.ranks``): ``flora`` (exact stacked sum, re-factored to each rank),
``hetlora`` (zero padding up, truncation down) and ``mira`` with ``space: delta`` (the Laplacian step on
the products). Server steps against dense float64 hand computations on small random tensors (full
``out x in`` matrices, PEFT's scale ``alpha / r`` per client); config validation; and end to end on
the tiny model: bytes by rank, a rank-r client training exactly as in a rank-r run, equal ranks giving
the homogeneous algorithms bit for bit, exact resume, ``mira compare`` and the Flower refusal."""
import copy
import json

import pytest
import torch

from mira.errors import MiraError
from mira.federated.strategies import FitRes, StrategyContext, get_strategy
from mira.federated.strategies.ranks import client_ranks, pad, rank_of, truncate
from tests.conftest import crash_then_resume

MODS = [("base_model.model.l.0.q.lora_A.weight", "base_model.model.l.0.q.lora_B.weight"),
        ("base_model.model.l.0.v.lora_A.weight", "base_model.model.l.0.v.lora_B.weight")]
KEYS = [k for pair in MODS for k in pair]
OUT, IN = 7, 6
ALPHA = 8.0
N = [10, 30, 20]
W = [n / sum(N) for n in N]


def _adapter(rank, g=None, zero_b=False):
    """Random float64 factors of ``rank`` from ``g`` (zeros without ``g``; ``zero_b``: B = 0, as an init)."""
    f64 = torch.float64
    s = {}
    for a, b in MODS:
        s[a] = torch.randn(rank, IN, generator=g, dtype=f64) if g is not None else torch.zeros(rank, IN, dtype=f64)
        s[b] = torch.randn(OUT, rank, generator=g, dtype=f64) if g is not None and not zero_b else \
            torch.zeros(OUT, rank, dtype=f64)
    return s


def _make(name, ranks, **params):
    cls = get_strategy(name)
    inits = {r: _adapter(r, torch.Generator().manual_seed(100 + r), zero_b=True) for r in set(ranks)}
    ctx = StrategyContext(num_clients=len(ranks), n_train=N[:len(ranks)], lr=0.01, local_steps=5, seed=0, keys=KEYS,
                          ranks=list(ranks), lora_alpha=ALPHA, inits=inits)
    return cls(cls.parse_params(params), ctx, _adapter(max(ranks)))


def _uploads(ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_adapter(r, g) for r in ranks]


def _s(r):
    return ALPHA / r


def _delta(state, a, b, r=None):
    r = r if r is not None else state[a].shape[0]
    return _s(r) * state[b] @ state[a]


def _best(d, r):
    u, s, vh = torch.linalg.svd(d)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


# -- who gets which rank -------------------------------------------------------------------------
def test_client_ranks_cycle_or_follow_data_size():
    assert client_ranks(None, "client", [5, 5]) is None
    assert client_ranks([4, 8, 16], "client", [1] * 5) == [4, 8, 16, 4, 8]
    assert client_ranks([4, 8, 16, 2, 2], "client", [1] * 5) == [4, 8, 16, 2, 2]
    # terciles by training-set size, smallest data first; ties by client id
    assert client_ranks([4, 8, 16], "data_size", [50, 10, 30, 20, 40, 60]) == [16, 4, 8, 4, 8, 16]
    assert client_ranks([4, 16], "data_size", [10, 10, 10]) == [4, 16, 16]
    with pytest.raises(MiraError, match="4 ranks for 3 clients") as e:
        client_ranks([4, 8, 16, 32], "client", [1, 1, 1])
    assert e.value.where == "lora.ranks"


def test_truncate_and_pad():
    g = torch.Generator().manual_seed(0)
    s = _adapter(4, g)
    t = truncate(s, 2)
    a, b = MODS[0]
    assert torch.equal(t[a], s[a][:2]) and torch.equal(t[b], s[b][:, :2]) and rank_of(t) == 2
    p = pad(t, 4)
    assert torch.equal(p[a][:2], s[a][:2]) and not p[a][2:].any() and not p[b][:, 2:].any()
    assert truncate(s, 4) is s and pad(s, 4) is s


# -- flora -----------------------------------------------------------------------------------------
def test_flora_is_the_truncated_svd_of_the_exact_sum_of_deltas():
    ranks = [2, 3, 4]
    s = _make("flora", ranks)
    assert s.heterogeneous_ranks and s.personalized
    # before any aggregation a client starts from its own rank's initial adapter
    assert all(torch.equal(s.configure_fit(c).adapter[KEYS[0]], s.ctx.inits[r][KEYS[0]]) for c, r in enumerate(ranks))
    ups = _uploads(ranks)
    info = s.aggregate_fit(1, {i: FitRes(u, n) for i, (u, n) in enumerate(zip(ups, N))})
    errs = {r: [] for r in ranks}
    for a, b in MODS:
        d = sum(w * _delta(u, a, b) for u, w in zip(ups, W))  # the exact average of the layers' deltas
        sv = torch.linalg.svdvals(d)
        for cid, r in enumerate(ranks):
            got = s.adapter_for(cid)
            assert got[a].shape == (r, IN) and got[b].shape == (OUT, r)
            best = _best(d, r)
            assert torch.allclose(_s(r) * got[b] @ got[a], best, atol=1e-10)
            # the symmetric split of the client's own delta: (sqrt(s) B)^T (sqrt(s) B) = (sqrt(s) A)(sqrt(s) A)^T = S_r
            bb, aa = _s(r) * got[b].T @ got[b], _s(r) * got[a] @ got[a].T
            assert torch.allclose(bb, torch.diag(sv[:r]), atol=1e-10) and torch.allclose(aa, bb, atol=1e-10)
            errs[r].append(float(torch.linalg.norm(d - best) / torch.linalg.norm(d)))
    every = [e for r in ranks for e in errs[r]]
    assert info["svd_error_mean"] == pytest.approx(sum(every) / len(every), rel=1e-9)
    assert info["svd_error_max"] == pytest.approx(max(every), rel=1e-9)
    for r in ranks:
        assert info[f"svd_error_r{r}_mean"] == pytest.approx(sum(errs[r]) / 2, rel=1e-9)
        assert info[f"svd_error_r{r}_max"] == pytest.approx(max(errs[r]), rel=1e-9)
    assert info["stacked_rank"] == 9
    # clients of one rank share one adapter (one global delta); resume from the state
    t = _make("flora", ranks)
    t.load_state_dict(s.state_dict())
    assert all(torch.equal(t.adapter_for(c)[k], s.adapter_for(c)[k]) for c in range(3) for k in KEYS)


def test_flora_with_one_rank_is_fedit_exact_bit_for_bit():
    ups = _uploads([3, 3, 3], seed=4)
    f, e = _make("flora", [3, 3, 3]), _make("fedit", [3, 3, 3], aggregation="exact")
    results = {i: FitRes(u, n) for i, (u, n) in enumerate(zip(ups, N))}
    info_f, info_e = f.aggregate_fit(1, results), e.aggregate_fit(1, results)
    assert all(torch.equal(f.adapter_for(c)[k], e.adapter_for(c)[k]) for c in range(3) for k in KEYS)
    assert info_f["svd_error_mean"] == info_e["svd_error_mean"] and info_f["svd_error_max"] == info_e["svd_error_max"]


def test_flora_rank_above_the_stacked_rank_is_exact():
    s = _make("flora", [2, 8])
    ups = _uploads([2, 2])  # both clients send rank-2 products: the sum has rank <= 4 < 8
    ups[1] = pad(ups[1], 8)
    info = s.aggregate_fit(1, {0: FitRes(ups[0], 10), 1: FitRes(ups[1], 30)})
    assert info["svd_error_r8_max"] == pytest.approx(0, abs=1e-12) and info["svd_error_r2_max"] > 0.01


# -- hetlora -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_aware", [True, False])
def test_hetlora_pads_averages_and_truncates(scale_aware):
    ranks = [2, 3, 4]
    s = _make("hetlora", ranks, scale_aware=scale_aware)
    assert s.heterogeneous_ranks and s.r_max == 4
    ups = _uploads(ranks, seed=1)
    info = s.aggregate_fit(1, {i: FitRes(u, n) for i, (u, n) in enumerate(zip(ups, N))})

    def c(r):  # factors of rank r in units of rank 4
        return (_s(r) / _s(4)) ** 0.5 if scale_aware else 1.0

    errs = {2: [], 3: []}
    for a, b in MODS:
        ga, gb = torch.zeros(4, IN, dtype=torch.float64), torch.zeros(OUT, 4, dtype=torch.float64)
        for u, w, r in zip(ups, W, ranks):  # zero padding, by hand
            ga[:r] += w * c(r) * u[a]
            gb[:, :r] += w * c(r) * u[b]
        g = s.global_adapter
        assert torch.allclose(g[a], ga, atol=1e-12) and torch.allclose(g[b], gb, atol=1e-12)
        for cid, r in enumerate(ranks):
            got = s.adapter_for(cid)
            assert torch.allclose(got[a], ga[:r] / c(r), atol=1e-12)
            assert torch.allclose(got[b], gb[:, :r] / c(r), atol=1e-12)
            if scale_aware:  # the client's layer adds exactly the delta its components have in G
                assert torch.allclose(_s(r) * got[b] @ got[a], _s(4) * gb[:, :r] @ ga[:r], atol=1e-10)
        full = gb @ ga
        for r in (2, 3):  # the share of G's product that a rank-r client drops
            errs[r].append(float(torch.linalg.norm(full - gb[:, :r] @ ga[:r]) / torch.linalg.norm(full)))
    for r in (2, 3):
        assert info[f"truncation_error_r{r}_mean"] == pytest.approx(sum(errs[r]) / 2, rel=1e-9)
        assert info[f"truncation_error_r{r}_max"] == pytest.approx(max(errs[r]), rel=1e-9)
    assert "truncation_error_r4_mean" not in info
    t = _make("hetlora", ranks, scale_aware=scale_aware)
    t.load_state_dict(s.state_dict())
    assert all(torch.equal(t.adapter_for(c)[k], s.adapter_for(c)[k]) for c in range(3) for k in KEYS)


def test_hetlora_with_one_rank_is_fedit_bit_for_bit():
    ups = _uploads([3, 3, 3], seed=5)
    h, f = _make("hetlora", [3, 3, 3]), _make("fedit", [3, 3, 3])
    results = {i: FitRes(u, n) for i, (u, n) in enumerate(zip(ups, N))}
    h.aggregate_fit(1, results)
    f.aggregate_fit(1, results)
    assert all(torch.equal(h.adapter_for(c)[k], f.adapter_for(c)[k]) for c in range(3) for k in KEYS)
    assert h.adapter_for(0) is h.adapter_for(2)  # one global adapter, as fedit


# -- mira in delta space -----------------------------------------------------------------------------
def test_mira_delta_step_on_products_of_different_ranks():
    ranks = [2, 3, 4]
    s = _make("mira", ranks, space="delta", graph="uniform", eta=0.1, **{"lambda": 0.5})
    step = 0.05
    # each client starts from its own rank's initial adapter
    assert [rank_of(s.adapter_for(c)) for c in range(3)] == ranks
    ups = _uploads(ranks, seed=2)
    info = s.aggregate_fit(1, {0: FitRes(ups[0], 10), 1: FitRes(ups[1], 30)})  # client 2 not sampled
    stored = {2: s.ctx.inits[4]}
    errs = []
    for a, b in MODS:
        d = {0: _delta(ups[0], a, b), 1: _delta(ups[1], a, b), 2: _delta(stored[2], a, b)}
        for k in (0, 1):  # neighbors: all (the stored adapter of the unsampled client 2), a_kl = 1
            target = d[k] - step * sum(d[k] - d[l] for l in range(3) if l != k)
            best = _best(target, ranks[k])
            got = s.adapter_for(k)
            assert got[a].shape == (ranks[k], IN)
            assert torch.allclose(_s(ranks[k]) * got[b] @ got[a], best, atol=1e-10)
            errs.append(float(torch.linalg.norm(target - best) / torch.linalg.norm(target)))
    assert info["svd_error_mean"] == pytest.approx(sum(errs) / len(errs), rel=1e-9)
    assert info["svd_error_max"] == pytest.approx(max(errs), rel=1e-9)
    assert info["step"] == pytest.approx(step) and not info["step_scaled"]
    assert s.adapter_for(2) is not None and torch.equal(s.adapter_for(2)[KEYS[0]], s.ctx.inits[4][KEYS[0]])


def test_mira_delta_keeps_a_client_without_neighbours_as_uploaded():
    s = _make("mira", [2, 4], space="delta", graph="uniform", neighbors="sampled", eta=0.1)
    ups = _uploads([2, 4], seed=3)
    s.aggregate_fit(1, {1: FitRes(ups[1], 30)})
    assert s.adapter_for(1) is ups[1]


def test_mira_factors_space_is_the_default_and_refuses_ranks():
    from mira.federated.strategies.mira import Mira

    assert Mira.parse_params({}).space == "factors"
    assert not Mira.supports_ranks(Mira.parse_params({})) and Mira.supports_ranks(Mira.parse_params({"space": "delta"}))
    with pytest.raises(MiraError, match="needs one LoRA rank") as e:
        _make("mira", [2, 4], space="delta", graph="similarity")
    assert e.value.where == "algorithm.graph"
    _make("mira", [4, 4], space="delta", graph="similarity")  # one rank: fine


# -- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora,match", [
    ({"ranks": [4, 0]}, "lora.ranks: ranks must be a non-empty list of positive integers"),
    ({"ranks": []}, "lora.ranks: ranks must be a non-empty list"),
    ({"ranks": [4, -2]}, "positive integers"),
    ({"rank_by": "data_size"}, "rank_by needs lora.ranks"),
    ({"ranks": [4], "rank_by": "size"}, "lora.rank_by"),
])
def test_config_refuses_bad_ranks(lora, match):
    from mira.config import validate

    with pytest.raises(MiraError, match=match) as e:
        validate({"lora": lora, "algorithm": {"name": "flora"}})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("algorithm", [{"name": "fedit"}, {"name": "mira"}, {"name": "fedsa_lora"},
                                       {"name": "fedit", "aggregation": "exact"}])
def test_only_rank_aware_strategies_take_per_client_ranks(algorithm):
    from mira.config import validate

    with pytest.raises(MiraError, match="per-client ranks need flora, hetlora or mira with space: delta") as e:
        validate({"lora": {"ranks": [4, 8]}, "algorithm": algorithm})
    assert e.value.where == "lora.ranks" and "\n" not in str(e.value)
    for ok in ({"name": "flora"}, {"name": "hetlora"}, {"name": "mira", "space": "delta"}):
        validate({"lora": {"ranks": [4, 8]}, "algorithm": ok})


# -- end to end on the tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from mira.config import validate
    from mira.federated.engine import Workspace

    raw = {
        "seed": 0, "model": {"path": str(tiny_model_dir)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"source": "synthetic", "tasks": ["add", "sub", "upper", "lower"], "max_per_task": 24,
                 "max_length": 80},
        "partition": {"name": "by_task", "test_size": 6},
        "federation": {"rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 0.01},
        "algorithm": {"name": "fedit"}, "eval": {"every": 1, "batch_size": 16}, "plots": False,
    }
    return raw, Workspace.load(validate(raw))


def _cfg(raw, name, opts=None, ranks=None, **lora):
    from mira.config import validate

    raw = copy.deepcopy(raw)
    raw["algorithm"] = {"name": name, **(opts or {})}
    if ranks is not None:
        raw["lora"]["ranks"] = ranks
    raw["lora"].update(lora)
    return validate(raw)


def _adapters(eng):
    return {c.id: eng.strategy.adapter_for(c.id) for c in eng.ws.clients}


def _same(a, b):
    return all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])


def _log(eng):
    drop = ("round_time_s", "train_step_time_s", "eval_time_s")
    return [{k: v for k, v in e.items() if k not in drop} for e in eng.rounds_log]


HETERO = [("flora", {}), ("hetlora", {}), ("mira", {"space": "delta", "eta": 0.05, "graph": "uniform"})]


@pytest.mark.parametrize("name,opts", HETERO, ids=[n for n, _ in HETERO])
def test_hetero_run_bytes_by_rank_and_exact_resume(base, name, opts, tmp_path, monkeypatch):
    from mira.federated.engine import Engine
    from mira.models.adapters import read_adapter_config

    raw, ws = base
    cfg = _cfg(raw, name, opts, ranks=[2, 4, 8])  # 4 clients: ranks 2, 4, 8, 2
    full = Engine(ws, cfg, tmp_path / "full")
    summary = full.run()
    assert summary["lora_ranks"] == [2, 4, 8, 2] and len(full.rows) == 2 * 4
    assert all(r["local_loss"] == r["local_loss"] for r in full.rows)
    # every message carries the client's own rank's tensors only: 16-byte header + float32 A and B
    per_rank = {r: sum(t.numel() for t in ws.slot.for_rank(r).initial_state.values()) * 4 for r in (2, 4, 8)}
    assert per_rank[8] == 2 * per_rank[4] == 4 * per_rank[2]
    clients = {c["id"]: c for c in summary["clients"]}
    for cid, r in enumerate([2, 4, 8, 2]):
        c = clients[cid]
        assert c["rank"] == r and c["adapter_bytes"] == per_rank[r]
        assert c["bytes_up"] == c["bytes_down"] == 2 * (16 + per_rank[r])
        assert {p.name for p in (tmp_path / "full" / "adapters" / f"client_{cid}").iterdir()} == {
            "adapter_config.json", "adapter_model.safetensors", "README.md"}
        assert read_adapter_config(tmp_path / "full" / "adapters" / f"client_{cid}")["r"] == r
    assert summary["bytes_up"] == sum(c["bytes_up"] for c in clients.values())
    assert summary["bytes_down"] == sum(c["bytes_down"] for c in clients.values())
    assert ws.model.active_adapter == "default"  # handed back as it was
    on_disk = json.loads((tmp_path / "full" / "rounds.json").read_text())
    if name == "flora":
        assert all(0 <= e["svd_error_r2_mean"] <= e["svd_error_r2_max"] < 1 for e in on_disk)
        assert all(e["stacked_rank"] == 16 for e in on_disk)
    if name == "hetlora":
        assert all(0 < e["truncation_error_r2_mean"] < 1 for e in on_disk)
    if name == "mira":
        assert all(0 <= e["svd_error_mean"] < 1 for e in on_disk)
    # killed in its last round and resumed from the checkpoint: the same run
    resumed, _ = crash_then_resume(ws, cfg, tmp_path / "resumed", 2, monkeypatch)
    assert _same(_adapters(full), _adapters(resumed))
    assert full.rows == resumed.rows and _log(full) == _log(resumed)


@pytest.mark.parametrize("name,opts,ref,ref_opts", [
    ("flora", {}, "fedit", {"aggregation": "exact"}),
    ("hetlora", {}, "fedit", {}),
    ("mira", {"space": "delta", "eta": 0.05}, "mira", {"space": "delta", "eta": 0.05}),
], ids=["flora=fedit-exact", "hetlora=fedit", "mira-delta"])
def test_one_rank_for_all_is_the_homogeneous_run_bit_for_bit(base, name, opts, ref, ref_opts, tmp_path):
    from mira.federated.engine import Engine

    raw, ws = base
    het = Engine(ws, _cfg(raw, name, opts, ranks=[4]), tmp_path / "het")
    het.run()
    hom = Engine(ws, _cfg(raw, ref, ref_opts), tmp_path / "hom")
    hom.run()
    assert _same(_adapters(het), _adapters(hom)) and het.rows == hom.rows
    assert het.bytes_up == hom.bytes_up and het.bytes_down == hom.bytes_down


def test_a_rank_2_client_trains_as_in_a_rank_2_run(base, tmp_path):
    """The hetero slot's rank-2 adapter (on the rank-4 model) starts, trains and evaluates exactly as a
    model that only has a rank-2 adapter: flora with every client at rank 2 on the rank-4 workspace is
    bit for bit fedit (exact) on a rank-2 workspace."""
    from mira.config import validate
    from mira.federated.client import client_fit
    from mira.federated.engine import Engine, Workspace, train_settings
    from mira.federated.strategies import FitIns
    from mira.train.trainer import LocalTrainer

    raw, ws = base
    raw2 = copy.deepcopy(raw)
    raw2["lora"]["r"] = 2
    ws2 = Workspace.load(validate(raw2))
    sub = ws.slot.for_rank(2)
    assert sub is ws.slot.for_rank(2) and sub.rank == 2 and ws.slot.for_rank(4) is ws.slot
    assert all(torch.equal(sub.initial_state[k], ws2.slot.initial_state[k]) for k in ws2.slot.keys())
    # one client's local training from the same (non-trivial) start
    g = torch.Generator().manual_seed(7)
    start = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in sub.initial_state.items()}
    cfg = _cfg(raw, "flora", ranks=[2])
    outs = []
    for slot, w in ((sub.activate(), ws), (ws2.slot, ws2)):
        trainer = LocalTrainer(slot, w.tokenizer.pad_token_id, train_settings(cfg))
        outs.append(client_fit(slot, trainer, w.train[1], FitIns(adapter=start), seed=123))
    ws.slot.activate()
    (a1, r1), (a2, r2) = outs
    assert r1.loss == r2.loss and all(torch.equal(a1[k], a2[k]) for k in a1)
    # and a whole run
    het = Engine(ws, cfg, tmp_path / "het")
    het.run()
    hom = Engine(ws2, _cfg(raw2, "fedit", {"aggregation": "exact"}), tmp_path / "hom")
    hom.run()
    assert _same(_adapters(het), _adapters(hom)) and het.rows == hom.rows


def test_ranks_by_data_size_and_too_many_ranks(base, tmp_path):
    from mira.federated.engine import Engine

    raw, ws = base
    eng = Engine(ws, _cfg(raw, "hetlora", ranks=[2, 8], rank_by="data_size"), tmp_path / "a")
    sizes = [len(t) for t in ws.train]
    order = sorted(range(4), key=lambda i: (sizes[i], i))
    assert [eng.ranks[i] for i in order] == [2, 2, 8, 8]
    with pytest.raises(MiraError, match="5 ranks for 4 clients"):
        Engine(ws, _cfg(raw, "flora", ranks=[2, 4, 8, 2, 4]), tmp_path / "b")


def test_compare_runs_rank_options_per_algorithm(base, tmp_path):
    from mira.federated.cli import _split_specs
    from mira.federated.compare import compare, parse_spec

    raw, _ = base
    specs = _split_specs("fedit,flora:lora.ranks=[2,4],hetlora:lora.ranks=[2,4],scale_aware=false")
    assert specs == ["fedit", "flora:lora.ranks=[2,4]", "hetlora:lora.ranks=[2,4],scale_aware=false"]
    assert parse_spec(specs[1])[0] == "flora(lora.ranks=[2,4])"
    with pytest.raises(MiraError, match="lora.r cannot differ"):
        parse_spec("flora:lora.r=4")
    cfg = _cfg(raw, "fedit")
    cfg.federation.rounds = 1
    result = compare(cfg, specs, tmp_path, seeds=[0])
    table = result["algorithms"]
    assert set(table) == {"fedit", "flora(lora.ranks=[2,4])", "hetlora(lora.ranks=[2,4],scale_aware=False)"}
    # ranks 2, 4, 2, 4 send 3/4 of the bytes of rank 4 for everybody (headers apart)
    assert table["flora(lora.ranks=[2,4])"]["bytes_up"] < table["fedit"]["bytes_up"]
    with pytest.raises(MiraError, match="per-client ranks need"):
        compare(cfg, ["fedit:lora.ranks=[2,4]"], tmp_path / "x", seeds=[0])


def test_flower_refuses_per_client_ranks(base):
    from mira.federated.flower.server import check_supported

    raw, _ = base
    with pytest.raises(MiraError, match="not supported on the Flower runtime") as e:
        check_supported(_cfg(raw, "flora", ranks=[2, 4]))
    assert e.value.where == "lora.ranks"
    check_supported(_cfg(raw, "flora"))
