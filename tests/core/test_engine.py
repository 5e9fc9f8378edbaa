import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mira.federated.engine as engine_mod
from mira.config import validate
from mira.federated.compare import compare
from mira.federated.engine import CHECKPOINT, Engine, Workspace
from mira.federated.wire import WireCodec
from tests.conftest import write_yaml


def _run(raw, out, **changes):
    raw = copy.deepcopy(raw)
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = validate(raw)
    ws = Workspace.load(cfg)
    eng = Engine(ws, cfg, out)
    return eng, eng.run()


def test_mira_run_writes_the_run_directory(tiny_cfg, tmp_path):
    eng, s = _run(tiny_cfg, tmp_path / "run", plots=True)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "graph.npy", "checkpoint.pt",
                 "plots/loss_curves.png", "plots/client_losses.png", "graphs/round_0001.npy"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("algorithm", "rounds", "clients", "mean_local_test_loss", "mean_global_test_loss", "bytes_up",
                "bytes_down", "wall_time_s"):
        assert key in summary
    assert summary["rounds"] == 2 and len(summary["clients"]) == 4
    assert set(summary["clients"][0]) >= {"id", "task", "n_train", "n_test", "local_test_loss", "global_test_loss"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 and {"round", "client", "task", "local_loss", "global_loss"} <= set(rows[0])
    # bytes: 2 rounds x 4 clients, each way, one compact message per transfer
    per_msg = summary["bytes_up"] / 8
    assert summary["bytes_up"] == summary["bytes_down"]
    assert per_msg <= 1.02 * summary["adapter_bytes"]
    # every client's adapter is a PEFT folder
    for c in range(4):
        assert (out / "adapters" / f"client_{c}" / "adapter_config.json").exists()
    # personalised: clients end with different adapters
    a0 = load_file(out / "adapters/client_0/adapter_model.safetensors")
    a1 = load_file(out / "adapters/client_1/adapter_model.safetensors")
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)


def test_training_lowers_the_loss(tiny_cfg, tmp_path):
    _, before = _run(dict(tiny_cfg), tmp_path / "r0", federation__rounds=1, federation__local_steps=1,
                     federation__lr=1e-9, algorithm={"name": "local"})
    _, after = _run(dict(tiny_cfg), tmp_path / "r1", federation__rounds=3, federation__local_steps=5,
                    algorithm={"name": "local"})
    assert after["mean_local_test_loss"] < before["mean_local_test_loss"] - 0.1


def test_saved_adapter_gives_mira_logits(tiny_cfg, tiny_model_dir, tmp_path):
    eng, _ = _run(tiny_cfg, tmp_path / "run")
    ids = torch.tensor([eng.ws.test[2].input_ids[0]])
    eng.ws.slot.set(eng.strategy.adapter_for(2))
    with torch.no_grad():
        ours = eng.ws.model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           tmp_path / "run/adapters/client_2")
        theirs = loaded(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_wire_format_overhead_and_half_precision(tiny_cfg, tmp_path):
    eng, s32 = _run(dict(tiny_cfg), tmp_path / "a", algorithm={"name": "fedit"})
    _, s16 = _run(dict(tiny_cfg), tmp_path / "b", algorithm={"name": "fedit"}, federation__wire_dtype="float16")
    assert s32["bytes_up"] / 8 <= 1.02 * s32["adapter_bytes"]
    assert s16["bytes_up"] / s32["bytes_up"] == pytest.approx(0.5, abs=0.01)
    codec = WireCodec(eng.ws.slot.initial_state)
    keys = eng.ws.slot.keys()
    state = {k: torch.randn_like(v) for k, v in eng.ws.slot.initial_state.items()}
    back = codec.decode(codec.encode(state, keys), keys)
    assert all(torch.equal(state[k], back[k]) for k in keys)


def test_ffa_lora_keeps_A_at_the_shared_init(tiny_cfg, tmp_path):
    eng, s = _run(tiny_cfg, tmp_path / "run", algorithm={"name": "ffa_lora"})
    init, final = eng.ws.slot.initial_state, eng.strategy.adapter_for(0)
    for k in init:
        if ".lora_A." in k:
            assert torch.equal(init[k], final[k])
        else:
            assert not torch.equal(init[k], final[k])
    full = _run(dict(tiny_cfg), tmp_path / "fedit", algorithm={"name": "fedit"})[1]
    assert s["bytes_up"] < full["bytes_up"]


def test_fedprox_with_large_mu_stays_near_the_global_adapter(tiny_cfg, tmp_path):
    def drift(algo):
        eng, _ = _run(dict(tiny_cfg), tmp_path / str(algo), federation__rounds=1, algorithm=algo)
        init = eng.ws.slot.initial_state
        return sum(float((eng.strategy.adapter_for(0)[k] - init[k]).norm()) for k in init)

    assert drift({"name": "fedprox", "mu": 1000.0}) < 0.5 * drift({"name": "fedit"})


def test_centralized_uses_the_same_number_of_steps(tiny_cfg, tmp_path):
    _, fed = _run(dict(tiny_cfg), tmp_path / "f", algorithm={"name": "fedit"}, federation__fraction=0.5)
    _, cen = _run(dict(tiny_cfg), tmp_path / "c", algorithm={"name": "centralized"}, federation__fraction=0.5)
    assert fed["train_steps"] == cen["train_steps"] == 2 * 2 * 2
    assert cen["bytes_up"] == 0 and len({c["global_test_loss"] for c in cen["clients"]}) == 1


def test_fraction_samples_without_replacement(tiny_cfg, tmp_path):
    cfg = validate({**tiny_cfg, "federation": {**tiny_cfg["federation"], "fraction": 0.5}})
    eng = Engine(Workspace.load(cfg), cfg, tmp_path)
    for rnd in range(1, 6):
        picked = eng.sample(rnd)
        assert len(picked) == 2 == len(set(picked))
    assert len({tuple(eng.sample(r)) for r in range(1, 20)}) > 1


def test_nan_update_is_rejected_and_the_round_completes(tiny_cfg, tmp_path, monkeypatch, caplog):
    real = engine_mod.client_fit
    calls = {"n": 0}

    def poisoned(slot, trainer, ds, ins, seed, steps=None):
        adapter, res = real(slot, trainer, ds, ins, seed, steps)
        calls["n"] += 1
        if calls["n"] == 2:  # round 1, client 1
            adapter = {k: torch.full_like(v, float("nan")) for k, v in adapter.items()}
        return adapter, res

    monkeypatch.setattr(engine_mod, "client_fit", poisoned)
    eng, s = _run(tiny_cfg, tmp_path / "run", algorithm={"name": "local"}, federation__rounds=1)
    assert s["rejected_updates"] == [{"round": 1, "client": 1}]
    assert all(torch.equal(eng.strategy.adapter_for(1)[k], eng.ws.slot.initial_state[k]) for k in eng.ws.slot.keys())
    assert not torch.equal(eng.strategy.adapter_for(0)[eng.ws.slot.keys()[1]], eng.ws.slot.initial_state[eng.ws.slot.keys()[1]])
    assert "NaN" in caplog.text
    assert np.isfinite(s["mean_local_test_loss"])


def test_similarity_graph_is_saved_each_round(tiny_cfg, tmp_path):
    eng, _ = _run(tiny_cfg, tmp_path / "run", algorithm={"name": "mira", "graph": "similarity"}, federation__rounds=2)
    g1, g2 = np.load(tmp_path / "run/graphs/round_0001.npy"), np.load(tmp_path / "run/graphs/round_0002.npy")
    assert g1.shape == (4, 4) and np.allclose(g2, g2.T) and (g2 >= 0).all() and (g2 > 0).any()


def test_compare_runs_algorithms_on_identical_data(tiny_cfg, tmp_path):
    cfg = validate({**tiny_cfg, "plots": True, "algorithm": {"name": "mira", "lambda": 0.5}})
    res = compare(cfg, ["local", "fedit", "mira", "mira:graph=similarity"], tmp_path / "cmp", seeds=[0])
    table = res["algorithms"]
    assert set(table) == {"local", "fedit", "mira", "mira(graph=similarity)"}
    for f in ("comparison.json", "comparison.md", "comparison.png", "client_local_loss.png", "loss_curves.png"):
        assert (tmp_path / "cmp" / f).exists()
    md = (tmp_path / "cmp/comparison.md").read_text()
    assert "| fedit |" in md and "mean local test loss" in md
    assert table["local"]["bytes_up"] == 0 and table["fedit"]["bytes_up"] > 0
    n = [json.loads((tmp_path / "cmp" / a / "summary.json").read_text())["clients"] for a in ("local", "fedit")]
    assert [c["n_train"] for c in n[0]] == [c["n_train"] for c in n[1]]


def _cli(args, env_extra=None, **kw):
    env = {**os.environ, "MIRA_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "mira", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    raw = {**tiny_cfg, "federation": {**tiny_cfg["federation"], "rounds": 6, "local_steps": 4},
           "algorithm": {"name": "mira", "graph": "similarity"}}
    cfg_path = write_yaml(tmp_path / "cfg.yaml", raw)
    full = _cli(["run", str(cfg_path), "--out", str(tmp_path / "full"), "-q"])
    killed = _cli(["run", str(cfg_path), "--out", str(tmp_path / "killed"), "-q"])
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ck = tmp_path / "killed" / CHECKPOINT
            if ck.exists() and torch.load(ck, weights_only=False)["round"] >= 2:
                break
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=False)["round"] < 6, "killed too late"
        assert not (tmp_path / "killed" / "summary.json").exists()
        assert full.wait(300) == 0, full.stderr.read()
    finally:
        for p in (full, killed):
            if p.poll() is None:
                p.kill()
                p.wait()
    resumed = _cli(["run", "--resume", str(tmp_path / "killed"), "-q"])
    assert resumed.wait(300) == 0, resumed.stderr.read()
    for c in range(4):
        a = load_file(tmp_path / f"full/adapters/client_{c}/adapter_model.safetensors")
        b = load_file(tmp_path / f"killed/adapters/client_{c}/adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert rows("full") == rows("killed") and len(rows("full")) == 6 * 4
    np.testing.assert_array_equal(np.load(tmp_path / "full/graph.npy"), np.load(tmp_path / "killed/graph.npy"))
