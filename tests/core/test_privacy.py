"""Differential privacy (``mira.privacy``): the accountant against the maintained libraries, the
DP-FedAvg / local-DP server and client steps against hand computations, DP-SGD's per-example
gradients and clipping through Opacus, config errors, and end-to-end runs (exact resume, a
noiseless DP-FedAvg that equals FedIT)."""
import copy
import math

import pytest
import torch

from mira.config import validate
from mira.errors import MiraError
from mira.federated.engine import Engine, Workspace
from mira.federated.strategies import FitRes, get_strategy
from mira.privacy import accountant as acc
from mira.privacy.config import ClientDP
from mira.privacy.dp_fedavg import DPFedAvg
from mira.privacy.local_dp import LocalDP
from tests.conftest import crash_then_resume

KEYS = ["m.0.q.lora_A.weight", "m.0.q.lora_B.weight"]


# -- the accountant ------------------------------------------------------------------------------
@pytest.mark.parametrize("z,q,steps", [(1.1, 0.01, 10_000), (0.8, 0.25, 40), (2.0, 0.5, 8), (1.0, 1.0, 5)])
def test_epsilon_agrees_with_opacus_rdp_accountant(z, q, steps):
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    ref.history = [(z, q, steps)]
    mine = acc.epsilon(acc.dpsgd_event(z, q, steps), 1e-5)
    assert mine == pytest.approx(ref.get_epsilon(1e-5), rel=2e-3)
    assert acc.epsilon(acc.central_event(z, q, steps), 1e-5) == mine  # the same event for clients


def test_events_reproduce_dp_accountings_reference_values():
    # reference values from dp-accounting's own test suite (rdp_privacy_accountant_test.py):
    # RDP of 50 Poisson-sampled Gaussians (q=0.01, z=2.5) at these orders ...
    from dp_accounting.rdp import RdpAccountant

    a = RdpAccountant(orders=[1.5, 2.5, 5, 50, 100])
    a.compose(acc.dpsgd_event(2.5, 0.01, 50))
    assert a._rdp == pytest.approx([6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02],
                                   rel=1e-4)
    # ... and z = 4.530877117 is exactly (1, 1e-6)-DP for one unsampled Gaussian (here: a local-DP upload,
    # whose sensitivity 2C doubles the multiplier needed)
    assert acc.epsilon(acc.local_event(2 * 4.530877117, 1), 1e-6) == pytest.approx(1.0, abs=0.02)
    assert acc.epsilon(acc.central_event(4.530877117, 1.0, 1), 1e-6) == pytest.approx(1.0, abs=0.02)


def test_calibration_meets_the_target_and_matches_opacus():
    from opacus.accountants.utils import get_noise_multiplier

    for target in (1.0, 4.0, 8.0):
        z = acc.calibrate(lambda s: acc.dpsgd_event(s, 0.05, 200), target, 1e-5, "x")
        assert acc.epsilon(acc.dpsgd_event(z, 0.05, 200), 1e-5) <= target * (1 + 1e-3)
        assert acc.epsilon(acc.dpsgd_event(z * 0.97, 0.05, 200), 1e-5) > target  # and is the smallest such z
        ref = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=0.05, steps=200,
                                   accountant="rdp", epsilon_tolerance=0.001)
        assert z == pytest.approx(ref, rel=0.02)


def test_local_event_is_a_gaussian_with_sensitivity_two_c():
    # one upload with noise z*C and sensitivity 2C: RDP's epsilon is an upper bound of the exact
    # (analytic) Gaussian's epsilon for sigma = z/2, and not far above it
    exact = acc.dp_accounting.get_epsilon_gaussian(2.0 / 2, 1e-5)
    rdp = acc.epsilon(acc.local_event(2.0, 1), 1e-5)
    assert exact <= rdp <= 1.5 * exact


def test_delta_must_be_below_one_over_n():
    with pytest.raises(MiraError, match="not below 1/n"):
        acc.check_delta(0.2, 8, "clients", "privacy.client.delta")
    acc.check_delta(0.1, 8, "clients", "privacy.client.delta")


# -- the mechanisms' steps -------------------------------------------------------------------------
def _state(a, b, shape=(2, 3)):
    return {KEYS[0]: torch.full(shape, float(a), dtype=torch.float64),
            KEYS[1]: torch.full(shape[::-1], float(b), dtype=torch.float64)}


def _norm(a, b, shape=(2, 3)):
    return math.sqrt(shape[0] * shape[1] * (a * a + b * b))


def _central(z=0.0, clip=1.0):
    cfg = ClientDP(noise_multiplier=z, clip_norm=clip, delta=1e-3)
    return DPFedAvg(cfg, num_clients=4, fraction=0.5, rounds=3, seed=0)


def test_dp_fedavg_step_is_the_clipped_sum_over_the_expected_count():
    m = _central(clip=1.0)
    start = _state(0.5, -0.5)
    ups = {0: _state(0.6, -0.4), 1: _state(3.5, -0.5), 3: _state(0.5, -0.5)}  # norms 0.245, 7.35, 0
    out, info = m.server_aggregate(1, {c: FitRes(u, 100) for c, u in ups.items()}, start, KEYS)
    assert list(out) == [0] and out[0].n_train == 1
    d1 = _norm(3.0, 0.0)
    expect_a = 0.5 + (0.1 + 3.0 / d1) / 2  # qK = 0.5 * 4 = 2; client 1 clipped to norm 1
    expect_b = -0.5 + (0.1 + 0.0) / 2
    assert torch.allclose(out[0].adapter[KEYS[0]], torch.full((2, 3), expect_a, dtype=torch.float64))
    assert torch.allclose(out[0].adapter[KEYS[1]], torch.full((3, 2), expect_b, dtype=torch.float64))
    assert info["dp_clients"] == 3 and m.participations == [1, 1, 0, 1]


def test_dp_fedavg_noise_has_the_promised_std():
    m = _central(z=0.7, clip=0.3)
    shape = (200, 300)
    start = _state(0.0, 0.0, shape)
    out, info = m.server_aggregate(1, {0: FitRes(_state(0.0, 0.0, shape), 1)}, start, KEYS)
    noise = torch.cat([out[0].adapter[k].flatten() for k in KEYS])
    assert float(noise.std()) == pytest.approx(0.7 * 0.3 / 2, rel=0.01)  # z C / (qK)
    assert abs(float(noise.mean())) < 1e-3
    assert info["dp_noise_std"] == pytest.approx(0.7 * 0.3 / 2)


def test_adaptive_clipping_follows_the_paper():
    from mira.privacy.config import AdaptiveClipping

    cfg = ClientDP(noise_multiplier=0.0, clip_norm=1.0, delta=1e-3,
                   adaptive=AdaptiveClipping(target_quantile=0.5, lr=0.2))
    m = DPFedAvg(cfg, num_clients=4, fraction=1.0, rounds=3, seed=0)
    start = _state(0.0, 0.0)
    ups = {0: _state(0.1, 0.0), 1: _state(0.2, 0.0), 2: _state(0.3, 0.0), 3: _state(5.0, 0.0)}
    m.server_aggregate(1, {c: FitRes(u, 1) for c, u in ups.items()}, start, KEYS)
    # 3 of 4 unclipped: b = 0.75 > 0.5, so C shrinks: C = exp(-0.2 * 0.25)
    assert m.clip_norm == pytest.approx(math.exp(-0.2 * 0.25))
    with pytest.raises(MiraError, match="count_stddev"):  # z must stay below 2 sigma_b (sigma_b = qK/20 = 0.2)
        DPFedAvg(ClientDP(noise_multiplier=1.0, delta=1e-3, adaptive=AdaptiveClipping()), num_clients=4,
                 fraction=1.0, rounds=3, seed=0)
    split = DPFedAvg(ClientDP(noise_multiplier=1.0, delta=1e-3, adaptive=AdaptiveClipping(count_stddev=2.0)),
                     num_clients=4, fraction=1.0, rounds=3, seed=0)
    assert split.z_update == pytest.approx((1.0 - 1 / 16) ** -0.5)


def test_poisson_sampling_rate():
    m = _central()
    counts = [len(m.sample(r, 400)) for r in range(1, 21)]
    assert sum(counts) / (20 * 400) == pytest.approx(0.5, abs=0.02)
    assert m.sample(3, 400) == m.sample(3, 400)  # seeded by round


def test_local_dp_clips_and_noises_each_upload():
    cfg = ClientDP(mode="local", noise_multiplier=0.0, clip_norm=1.0, delta=1e-3)
    m = LocalDP(cfg, num_clients=3, fraction=1.0, rounds=2, seed=0)
    start = _state(1.0, 1.0)
    out = m.client_upload(1, 2, start, _state(4.0, 1.0), KEYS)
    d = _norm(3.0, 0.0)
    assert torch.allclose(out[KEYS[0]], torch.full((2, 3), 1.0 + 3.0 / d, dtype=torch.float64))
    assert torch.equal(out[KEYS[1]], start[KEYS[1]])
    noisy = LocalDP(ClientDP(mode="local", noise_multiplier=2.0, clip_norm=0.1, delta=1e-3), num_clients=3,
                    fraction=1.0, rounds=2, seed=0)
    shape = (300, 300)
    out = noisy.client_upload(1, 0, _state(0.0, 0.0, shape), _state(0.0, 0.0, shape), KEYS)
    assert float(out[KEYS[0]].std()) == pytest.approx(0.2, rel=0.01)
    assert noisy.participations == [1, 0, 0]
    rep = noisy.report()
    assert rep["epsilon"] == pytest.approx(acc.epsilon(acc.local_event(2.0, 1), 1e-3))
    assert rep["epsilon_per_client"][1] == 0.0


def test_which_strategies_take_which_mode():
    for name in ("fedit", "fedprox", "ffa_lora", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        DPFedAvg.check_strategy(get_strategy(name))
    for name in ("mira", "local", "fedsa_lora", "fedit_ft", "oneshot"):
        with pytest.raises(MiraError, match="mode: local"):
            DPFedAvg.check_strategy(get_strategy(name))


# -- DP-SGD through Opacus -------------------------------------------------------------------------
def test_per_example_gradients_and_clipping(tiny_model_dir):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from mira.data.prompts import collate
    from mira.privacy.dp_sgd import per_example_loss

    cfg = _base_raw(tiny_model_dir)
    ws = Workspace.load(validate(cfg))
    slot, ds = ws.slot, ws.train[0]
    params = slot.trainable(slot.keys())
    batch = collate(ds, [0, 1, 2], ws.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    # the per-example loss is the model's own loss for a batch of one
    one = collate(ds, [1], ws.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = slot.model(**{k: v for k, v in one.items() if k != "labels"}).logits
        assert float(per_example_loss(logits, one["labels"])[0]) == pytest.approx(float(slot.model(**one).loss), rel=1e-5)
    gsm = GradSampleModule(slot.model, loss_reduction="mean", strict=False)
    try:
        per_example_loss(gsm(**batch).logits, labels).mean().backward()
        for p in params:  # Opacus's per-example gradients average to the ordinary gradient
            assert p.grad_sample.shape[0] == 3
            assert torch.allclose(p.grad_sample.mean(0), p.grad, atol=1e-7, rtol=1e-4)
        norms = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in params))
        clip = float(norms.min()) / 2  # every example clipped
        opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                          expected_batch_size=3, loss_reduction="mean")
        expected = [sum(p.grad_sample[i] * (clip / float(norms[i])) for i in range(3)) / 3 for p in params]
        opt.pre_step()
        for p, e in zip(params, expected):
            assert torch.allclose(p.grad, e, atol=1e-7, rtol=1e-4)
    finally:
        gsm._close()
        for p in params:
            p.grad = None


# -- end to end ------------------------------------------------------------------------------------
def _base_raw(tiny_model_dir, **privacy):
    return {
        "seed": 0, "model": {"path": str(tiny_model_dir)}, "lora": {"r": 4, "alpha": 8},
        "data": {"source": "synthetic", "tasks": ["add", "sub", "upper", "lower"], "max_per_task": 24,
                 "max_length": 80},
        "partition": {"name": "by_task", "test_size": 6},
        "federation": {"rounds": 3, "local_steps": 2, "batch_size": 4, "lr": 0.01},
        "algorithm": {"name": "fedit"}, "eval": {"every": 3, "batch_size": 16}, "plots": False,
        **({"privacy": privacy} if privacy else {}),
    }


@pytest.fixture(scope="module")
def ws(tiny_model_dir):
    return Workspace.load(validate(_base_raw(tiny_model_dir)))


def _cfg(tiny_model_dir, name="fedit", fed=None, **privacy):
    raw = _base_raw(tiny_model_dir, **privacy)
    raw["algorithm"] = {"name": name}
    raw["federation"].update(fed or {})
    return validate(raw)


def _adapters(eng):
    return {c.id: {k: v.clone() for k, v in eng.strategy.adapter_for(c.id).items()} for c in eng.ws.clients}


def test_noiseless_dp_fedavg_with_full_participation_is_fedit(ws, tiny_model_dir, tmp_path):
    # equal client sizes, q = 1, z = 0, a clip no update reaches: the private mean is FedIT's mean
    assert len({len(t) for t in ws.train}) == 1
    plain = Engine(ws, _cfg(tiny_model_dir), tmp_path / "plain")
    plain.run()
    dp = Engine(ws, _cfg(tiny_model_dir, client={"noise_multiplier": 0.0, "clip_norm": 1e6, "delta": 1e-3}), tmp_path / "dp")
    summary = dp.run()
    a, b = _adapters(plain), _adapters(dp)
    # float32: the private mean (a sum over the sampled clients, then / qK) and FedIT's weighted mean
    # round differently, and 3 rounds of training amplify that to ~1e-6 (1.4e-6 seen with numpy 2.4 /
    # torch 2.13 on this VM); a wrong weight, clip or denominator is orders of magnitude larger
    worst = max(float((a[c][k] - b[c][k]).abs().max()) for c in a for k in a[c])
    assert worst <= 1e-5, worst
    assert summary["privacy"]["client"]["epsilon"] is None  # no noise: no finite epsilon


@pytest.mark.parametrize("name,privacy", [
    ("fedit", {"client": {"epsilon": 8.0, "clip_norm": 0.05, "delta": 1e-3}}),
    ("fedadam", {"client": {"noise_multiplier": 0.5, "clip_norm": 0.05, "delta": 1e-3,
                            "adaptive": {"count_stddev": 1.0}}}),
    ("mira", {"client": {"mode": "local", "epsilon": 8.0, "clip_norm": 0.05, "delta": 1e-3}}),
    ("fedit", {"sample": {"epsilon": 8.0, "max_grad_norm": 0.5}}),
], ids=["central", "central-adaptive-fedadam", "local-mira", "dp-sgd"])
def test_private_runs_report_epsilon_and_resume_exactly(ws, tiny_model_dir, tmp_path, monkeypatch, name, privacy):
    fed = {"fraction": 0.5} if "client" in privacy and privacy["client"].get("mode") != "local" else {}
    cfg = _cfg(tiny_model_dir, name, fed, **privacy)
    full = Engine(ws, cfg, tmp_path / "full")
    summary = full.run()
    resumed, again = crash_then_resume(ws, cfg, tmp_path / "resumed", 3, monkeypatch)
    a, b = _adapters(full), _adapters(resumed)
    assert all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])
    level = "client" if "client" in privacy else "sample"
    rep = summary["privacy"][level]
    assert again["privacy"] == summary["privacy"]
    target = privacy[level].get("epsilon")
    if target:
        assert rep["epsilon"] <= target * 1.001 and rep["epsilon"] > 0.5 * target
    if level == "client" and rep["mode"] == "central":
        ev = acc.central_event(rep["noise_multiplier"], 0.5, 3)
        assert rep["epsilon"] == pytest.approx(acc.epsilon(ev, 1e-3))
        assert sum(rep["participations"]) == sum(len(e["sampled"]) for e in full.rounds_log)
    assert math.isfinite(summary["mean_local_test_loss"])


@pytest.mark.parametrize("privacy,name,match", [
    ({"client": {"noise_multiplier": 1.0, "epsilon": 2.0}}, "fedit", "exactly one of"),
    ({"client": {"noise_multiplier": -1.0}}, "fedit", "greater than or equal to 0"),
    ({"client": {"epsilon": float("inf")}}, "fedit", "finite"),
    ({"client": {"noise_multiplier": 1.0, "delta": 0.5}}, "fedit", "not below 1/n"),
    ({"client": {"noise_multiplier": 1.0, "delta": 1e-3}}, "mira", "mode: local"),
    ({"client": {"mode": "local", "noise_multiplier": 1.0, "adaptive": {}}}, "mira", "adaptive"),
    ({"client": {"noise_multiplier": 1.0, "delta": 1e-3}}, "centralized", "nothing to protect"),
    ({"sample": {"noise_multiplier": 1.0, "delta": 0.9}}, "fedit", "not below 1/n"),
    ({"client": {"noise_multiplier": 1.0, "clip": 2}}, "fedit", "unknown field"),
], ids=["both", "negative", "inf", "delta-client", "central-mira", "adaptive-local", "pooled", "delta-sample",
        "unknown"])
def test_bad_privacy_settings_get_one_line(ws, tiny_model_dir, tmp_path, privacy, name, match):
    with pytest.raises(MiraError, match=match) as e:
        Engine(ws, _cfg(tiny_model_dir, name, **copy.deepcopy(privacy)), tmp_path / "x")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


# -- fixes from the independent review ---------------------------------------------------------------
def test_adaptive_count_uses_shifted_bits_over_the_expected_count():
    from mira.privacy.config import AdaptiveClipping

    cfg = ClientDP(noise_multiplier=0.0, clip_norm=1.0, delta=1e-3, adaptive=AdaptiveClipping(target_quantile=0.5, lr=0.2))
    m = DPFedAvg(cfg, num_clients=4, fraction=0.5, rounds=3, seed=0)  # qK = 2
    ups = {0: _state(0.1, 0.0), 1: _state(0.2, 0.0), 2: _state(5.0, 0.0)}  # 2 of 3 unclipped
    m.server_aggregate(1, {c: FitRes(u, 1) for c, u in ups.items()}, _state(0.0, 0.0), KEYS)
    b = (2 - 3 / 2) / 2 + 0.5  # sum of (bit - 1/2), over qK, plus 1/2: sensitivity 1/2 as Thm 1 needs
    assert m.clip_norm == pytest.approx(math.exp(-0.2 * (b - 0.5)))


def test_dpsgd_delta_is_checked_against_the_largest_client_and_z_covers_every_client():
    from mira.privacy.config import SampleDP
    from mira.privacy.dp_sgd import DPSGD

    d = DPSGD(SampleDP(noise_multiplier=1.0), n_train=[10, 10_000], batch_size=8, steps_per_round=[2, 2], rounds=2)
    assert d.delta < 1 / 10_000
    with pytest.raises(MiraError, match="not below 1/n"):
        DPSGD(SampleDP(noise_multiplier=1.0, delta=1e-3), n_train=[10, 5_000], batch_size=8, steps_per_round=[2, 2],
              rounds=2)
    # n = 1 trains 1 step at q = 1, n = 9 two steps at q = 8/9: the second needs more noise
    d = DPSGD(SampleDP(epsilon=2.0, delta=1e-3), n_train=[1, 9], batch_size=8, steps_per_round=[1, 2], rounds=3)
    for c, steps in enumerate([1, 2]):
        assert acc.epsilon(acc.dpsgd_event(d.z, d.rate(c), 3 * steps), 1e-3) <= 2.0 * 1.001


def test_dpsgd_refuses_strategies_with_another_step_budget(ws, tiny_model_dir, tmp_path):
    for name in ("oneshot", "fedit_ft"):
        with pytest.raises(MiraError, match="budget"):
            Engine(ws, _cfg(tiny_model_dir, name, sample={"noise_multiplier": 1.0}), tmp_path / name)


def test_secure_noise_is_not_derivable_from_the_seed():
    shape = (50, 50)
    seeded = _central(z=1.0)
    secure = _central(z=1.0)
    secure.secure = True
    a = seeded.server_aggregate(1, {}, _state(0.0, 0.0, shape), KEYS)[0][0].adapter[KEYS[0]]
    b = secure.server_aggregate(1, {}, _state(0.0, 0.0, shape), KEYS)[0][0].adapter[KEYS[0]]
    again = _central(z=1.0).server_aggregate(1, {}, _state(0.0, 0.0, shape), KEYS)[0][0].adapter[KEYS[0]]
    assert torch.equal(a, again) and not torch.allclose(a, b)
    assert "dp_update_norm_median" not in seeded.server_aggregate(2, {}, _state(0.0, 0.0), KEYS)[1]
