"""The new strategies end to end on the tiny model: ``mira run``'s engine, exact resume
from a checkpoint read with ``weights_only=True``, PEFT's scaling under ``aggregation: exact``,
``fedit_ft``'s fine-tuning round, and the Flower ServerApp's engine (with an in-process
stand-in for the SuperLink that hands each message to a ``NodeRuntime``, the SuperNode's code)."""
import copy
import json

import pytest
import torch

from mira.config import validate
from mira.federated.engine import Engine, Workspace
from mira.federated.strategies import FitRes
from tests.conftest import crash_then_resume

NEW = [("fedavgm", {}), ("fedadam", {}), ("fedyogi", {}), ("fedadagrad", {}), ("fedit", {"aggregation": "exact"}),
       ("fedsa_lora", {}), ("fedit_ft", {})]
IDS = [n if not o else f"{n}-{next(iter(o.values()))}" for n, o in NEW]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    raw = {
        "seed": 0, "model": {"path": str(tiny_model_dir)}, "lora": {"r": 4, "alpha": 8},
        "data": {"source": "synthetic", "tasks": ["add", "sub", "upper", "lower"], "max_per_task": 24,
                 "max_length": 80},
        "partition": {"name": "by_task", "test_size": 6},
        "federation": {"rounds": 3, "local_steps": 2, "batch_size": 4, "lr": 0.01},
        "algorithm": {"name": "fedit"}, "eval": {"every": 1, "batch_size": 16}, "plots": False,
    }
    cfg = validate(raw)
    return raw, Workspace.load(cfg)


def _cfg(raw, name, opts, **fed):
    raw = copy.deepcopy(raw)
    raw["algorithm"] = {"name": name, **opts}
    raw["federation"].update(fed)
    return validate(raw)


def _adapters(eng):
    return {c.id: eng.strategy.adapter_for(c.id) for c in eng.ws.clients}


def _same(a, b, atol=0.0):
    return all(torch.allclose(a[c][k], b[c][k], atol=atol, rtol=0) for c in a for k in a[c])


def _log(eng):
    drop = ("round_time_s", "train_step_time_s", "eval_time_s")
    return [{k: v for k, v in e.items() if k not in drop} for e in eng.rounds_log]


@pytest.mark.parametrize("name,opts", NEW, ids=IDS)
def test_runs_and_resumes_exactly(base, name, opts, tmp_path, monkeypatch):
    raw, ws = base
    cfg = _cfg(raw, name, opts)
    full = Engine(ws, cfg, tmp_path / "full")
    summary = full.run()
    rounds = full.strategy.num_rounds(3)
    assert summary["rounds"] == rounds and len(full.rows) == rounds * 4
    assert all(r["local_loss"] == r["local_loss"] for r in full.rows)  # no NaN
    # fedit_ft: killed between the last FedIT round and the fine-tuning round
    resumed, _ = crash_then_resume(ws, cfg, tmp_path / "resumed", rounds, monkeypatch)
    assert _same(_adapters(full), _adapters(resumed))
    assert full.rows == resumed.rows and _log(full) == _log(resumed)
    on_disk = json.loads((tmp_path / "full" / "rounds.json").read_text())
    if name in ("fedit", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert all("fedavg_error_mean" in e and "fedavg_error_max" in e for e in on_disk)
    if opts.get("aggregation") == "exact":
        assert all(0 <= e["svd_error_mean"] <= e["svd_error_max"] < 1 for e in on_disk)


def test_fedavg_reports_its_aggregation_error(base, tmp_path):
    raw, ws = base
    eng = Engine(ws, _cfg(raw, "fedit", {}, rounds=2), tmp_path)
    eng.run()
    errs = [e["fedavg_error_mean"] for e in eng.rounds_log]
    assert all(0 < e < 1 for e in errs) and all(e["fedavg_error_max"] >= e["fedavg_error_mean"] for e in eng.rounds_log)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def test_exact_aggregation_is_the_svd_of_the_average_delta_with_peft_scaling(base, tmp_path):
    raw, ws = base
    cfg = _cfg(raw, "fedit", {"aggregation": "exact"}, rounds=1)
    eng = Engine(ws, cfg, tmp_path)
    seen = {}
    real = eng.strategy.aggregate_fit

    def spy(rnd, results):
        seen.update(results)
        return real(rnd, results)

    eng.strategy.aggregate_fit = spy
    eng.run()
    slot, layers = ws.slot, _lora_layers(ws.slot.model)
    assert layers and all(m.scaling["default"] == 2.0 for m in layers.values())  # alpha 8 / r 4

    def deltas(adapter):
        slot.set(adapter)
        return {n: m.get_delta_weight("default").detach().double().clone() for n, m in layers.items()}

    total = sum(r.n_train for r in seen.values())
    per_client = [(r.n_train / total, deltas(r.adapter)) for r in seen.values()]
    merged = deltas(eng.strategy.global_adapter)
    errs = []
    for n in layers:
        d = sum(w * dc[n] for w, dc in per_client)  # the exact average of the layers' deltas s * B_k A_k
        u, s, vh = torch.linalg.svd(d)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        assert torch.allclose(merged[n], best, atol=1e-6 * float(s[0]))
        errs.append(float(torch.linalg.norm(d - best) / torch.linalg.norm(d)))
    info = eng.rounds_log[0]
    assert info["svd_error_mean"] == pytest.approx(sum(errs) / len(errs), rel=1e-4)
    assert info["svd_error_max"] == pytest.approx(max(errs), rel=1e-4)


def test_fedit_ft_every_client_finetunes_its_own_adapter(base, tmp_path):
    raw, ws = base
    cfg = _cfg(raw, "fedit_ft", {"finetune_steps": 4}, rounds=2, fraction=0.5)
    eng = Engine(ws, cfg, tmp_path)
    s = eng.run()
    log = eng.rounds_log
    assert s["rounds"] == 3 and [len(e["sampled"]) for e in log] == [2, 2, 4]
    assert log[-1]["sampled"] == [0, 1, 2, 3] and log[-1]["finetuned_clients"] == [0, 1, 2, 3]
    assert log[-1]["train_steps"] == 4 * 4  # finetune_steps = 2 R
    ads = _adapters(eng)
    assert len({id(a) for a in ads.values()}) == 4
    g = eng.strategy.global_adapter
    assert all(not torch.equal(ads[c][k], g[k]) for c in ads for k in g if ".lora_B." in k)
    # after round 2 every client was scored with the global adapter; after fine-tuning on its own data, lower
    r2 = {r["client"]: r["local_loss"] for r in eng.rows if r["round"] == 2}
    r3 = {r["client"]: r["local_loss"] for r in eng.rows if r["round"] == 3}
    assert sum(r3.values()) < sum(r2.values())


# -- the Flower ServerApp's engine ---------------------------------------------------------------
class InProcessFleet:
    """``Fleet``'s interface (``exchange``, ``refresh``, ``node_of``, ``hello_bytes``) with every
    message handed, as a Flower RecordDict, to the client's ``NodeRuntime`` (the SuperNode's code)."""

    def __init__(self, runtimes):
        self.rt = runtimes
        self.node_of = {c: 100 + c for c in runtimes}
        self.hello_bytes = 0

    def refresh(self, wait: float = 30.0) -> None:
        pass

    def exchange(self, msg_type, contents, group, min_ok):
        from mira.federated.flower import protocol as p
        from mira.federated.flower.server import Reply

        out = {}
        for cid, content in contents.items():
            if msg_type == p.MSG_FIT:
                task = p.parse_fit(content)
                buf, m = self.rt[cid].fit(task)
                out[cid] = Reply(cid, p.fit_reply(buf, m), None, task.adapter.nbytes, buf.nbytes)
            else:
                bufs, own, _ = p.parse_eval(content)
                losses, tokens, extra = self.rt[cid].evaluate(bufs, own)
                out[cid] = Reply(cid, p.eval_reply(losses, tokens, extra), None, 0, 0)
        return out


@pytest.fixture(scope="module")
def nodes(base):
    from mira.federated.flower.node import NodeRuntime, NodeSpec

    raw, ws = base
    cfg = _cfg(raw, "fedit", {}, rounds=2)
    return {c.id: NodeRuntime(cfg, NodeSpec(c.id, len(ws.clients))) for c in ws.clients}


@pytest.mark.parametrize("name,opts", NEW, ids=IDS)
def test_flower_server_runs_the_strategy_unchanged(base, nodes, name, opts, tmp_path):
    from mira.federated.flower.node import load_slot
    from mira.federated.flower.protocol import NodeInfo
    from mira.federated.flower.server import flower_engine_class, remote_workspace
    from mira.federated.flower.settings import RunSettings

    raw, ws = base
    cfg = _cfg(raw, name, opts, rounds=2)
    ref = Engine(ws, cfg, tmp_path / "ref")
    r = ref.run()
    tokenizer, slot = load_slot(cfg)
    infos = [NodeInfo(100 + c.id, c.id, len(ws.clients), c.task, len(ws.train[c.id]), len(ws.test[c.id]))
             for c in ws.clients]
    fws = remote_workspace(cfg, tokenizer, slot, infos)
    fl = flower_engine_class()(fws, cfg, tmp_path / "flower", InProcessFleet(nodes), RunSettings())
    s = fl.run()
    assert s["runtime"] == "flower" and s["rounds"] == r["rounds"]
    assert _same(_adapters(ref), _adapters(fl), atol=1e-6)
    assert (s["bytes_up"], s["bytes_down"]) == (r["bytes_up"], r["bytes_down"])
    assert s["mean_local_test_loss"] == pytest.approx(r["mean_local_test_loss"], abs=1e-6)
    assert [e["sampled"] for e in fl.rounds_log] == [e["sampled"] for e in ref.rounds_log]
    for key in ("fedavg_error_mean", "svd_error_mean"):
        if key in ref.rounds_log[0]:
            assert [e.get(key, 0) for e in fl.rounds_log] == pytest.approx([e.get(key, 0) for e in ref.rounds_log],
                                                                           rel=1e-6)
