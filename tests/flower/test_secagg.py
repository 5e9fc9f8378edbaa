"""Secure aggregation (``privacy.secure_aggregation``): Flower's SecAgg+ workflow and mod around
mira's strategies (``mira.federated.flower.secagg``).

* the config section and the refusals (fast);
* the whole protocol in one process (fast): ``FlowerEngine`` over an in-memory ``Grid`` whose
  messages are answered by mira's real ClientApp (``secaggplus_mod`` included) under a Context
  kept per node, as a SuperNode keeps it; the messages are deflated to Flower's objects and
  inflated again on the way, as on a real link. Here the test can see every client's upload,
  so it checks the protocol's promise directly: each round's SecAgg+ mean equals the
  ``n_train``-weighted mean of the uploads, to the quantisation bound;
* a process test (slow): a SuperLink and 3 SuperNodes on 127.0.0.1, fedit with and without
  SecAgg+.

The tolerance. SecAgg+ (Flower's ``secaggplus_mod``) uploads ``Q(w_k x_k)``, with
``w_k = round(n_k / max_weight * T) / T``, ``Q`` clipping to ``[-c, c]`` and rounding
stochastically to the grid of step ``2c / T`` (``c = clipping_range``, ``T =
quantization_range``): each client's value is off by less than one step. The server divides the
sum by ``sum_k w_k``, so one value of the mean is off by less than

    bound = K * (2c / T) / sum_k w_k

(``K`` clients aggregated; ``max_weight`` defaults to the largest ``n_train``, so with equal
sizes ``bound = 2c / T = 16 / 2^22 = 3.8e-6`` for Flower's defaults). Across rounds there is no
such bound: round 2 trains from a global adapter that differs by up to ``bound``, and AdamW's
normalised first steps turn some of those differences into much larger ones (measured: 1.5x to
500x ``bound`` after 2 rounds, depending on lr and on the random rounding). So every round is
compared with the plain aggregate of *the same* uploads: in the process test, round 1 with the
run without SecAgg+ (the same start and seeds give the same uploads), and round 2 with the
in-process engine continuing from the SecAgg run's round-1 checkpoint (the same uploads again).
"""
from __future__ import annotations

import shutil
import time
import uuid

import pytest
import torch

from mira.errors import MiraError

from .conftest import N_CLIENTS, flower_cfg, read_json

STAGES = ["setup", "share_keys", "collect_masked_vectors", "unmask"]
FLOAT32 = 1e-7  # the adapters are float32 (an ulp is ~3e-8 at their size); the bound is for exact arithmetic


def fedit_cfg(algorithm="fedit", secagg: dict | None = None, **sections) -> dict:
    raw = flower_cfg(**sections)
    raw["algorithm"] = {"name": algorithm} if isinstance(algorithm, str) else dict(algorithm)
    if secagg is not None:
        raw["privacy"] = {"secure_aggregation": secagg}
    return raw


def bound_of(sizes: list[int], c: float = 8.0, T: int = 2**22, max_weight: float | None = None) -> float:
    """The per-value error bound of one SecAgg+ mean (see the module docstring)."""
    mw = max_weight or max(sizes)
    return len(sizes) * (2 * c / T) / sum(round(n / mw * T) / T for n in sizes)


def weighted_mean(uploads: dict[int, tuple[int, dict]]) -> dict:
    total = sum(n for n, _ in uploads.values())
    keys = next(iter(uploads.values()))[1].keys()
    return {k: sum(a[k].double() * n for n, a in uploads.values()) / total for k in keys}


def dmax(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- the config section and the refusals -------------------------------------------------------
def test_config_section_defaults_and_checks():
    from mira.config import validate

    sa = validate(fedit_cfg(secagg={})).privacy.secure_aggregation
    assert (sa.num_shares, sa.reconstruction_threshold, sa.clipping_range, sa.quantization_range, sa.max_weight) == \
        (3, 2, 8.0, 2**22, None)
    assert not validate(fedit_cfg(secagg={})).privacy.enabled  # not differential privacy
    assert validate(fedit_cfg(secagg={"num_shares": 0.5, "reconstruction_threshold": 0.6})).privacy \
        .secure_aggregation.num_shares == 0.5
    for bad, field in [({"num_share": 3}, "num_share"), ({"num_shares": 2}, "num_shares"),
                       ({"num_shares": 3, "reconstruction_threshold": 3}, "reconstruction_threshold"),
                       ({"reconstruction_threshold": 1.5}, "reconstruction_threshold"),
                       ({"quantization_range": 2**32}, "quantization_range"),
                       ({"quantization_range": 1.5}, "quantization_range"),
                       ({"clipping_range": 0}, "clipping_range"), ({"max_weight": -1}, "max_weight")]:
        with pytest.raises(MiraError, match=field):
            validate(fedit_cfg(secagg=bad))


def test_mira_run_refuses_it(tmp_path):
    """In-process there is no network whose messages could be hidden: a one-line refusal."""
    from mira.config import validate
    from mira.federated.engine import Engine

    cfg = validate(fedit_cfg(secagg={}))
    with pytest.raises(MiraError, match="needs the Flower runtime") as e:
        Engine(None, cfg, tmp_path)  # refused before the workspace is touched
    assert e.value.where == "privacy.secure_aggregation" and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["mira", "local", "fedsa_lora", "fedit_ft", "oneshot", "centralized"])
def test_strategies_needing_individual_updates_are_refused(name):
    from mira.config import validate
    from mira.federated.flower.server import check_supported

    cfg = validate(fedit_cfg(algorithm=name, secagg={}))
    with pytest.raises(MiraError) as e:
        check_supported(cfg)
    assert "\n" not in str(e.value)
    if name != "centralized":  # refused earlier: it trains on the pooled data
        assert e.value.where == "privacy.secure_aggregation" and "individual updates" in str(e.value)


def test_other_refusals_and_the_allowed_strategies():
    from mira.config import validate
    from mira.federated.flower.secagg import SUM_ONLY, SecAggPlan
    from mira.federated.flower.server import check_supported

    for name in SUM_ONLY:
        check_supported(validate(fedit_cfg(algorithm=name, secagg={})))
    with pytest.raises(MiraError, match="aggregation: fedavg") as e:
        check_supported(validate(fedit_cfg(algorithm={"name": "fedit", "aggregation": "exact"}, secagg={})))
    assert e.value.where == "algorithm.aggregation"
    with pytest.raises(MiraError, match="differential privacy") as e:
        check_supported(validate({**fedit_cfg(), "privacy": {"secure_aggregation": {},
                                                              "client": {"noise_multiplier": 1.0}}}))
    assert e.value.where == "privacy.secure_aggregation"

    sa = validate(fedit_cfg(secagg={})).privacy.secure_aggregation
    with pytest.raises(MiraError, match="at least 2 clients") as e:
        SecAggPlan.build(sa, [12, 12, 12], per_round=1)
    assert e.value.where == "federation.fraction"
    wide = validate(fedit_cfg(secagg={"num_shares": 7, "reconstruction_threshold": 4})).privacy.secure_aggregation
    with pytest.raises(MiraError, match="3 neighbours"):
        SecAggPlan.build(wide, [12, 12, 12], per_round=3)
    plan = SecAggPlan.build(sa, [10, 12, 7], per_round=3)
    assert (plan.shares, plan.threshold, plan.max_weight) == (3, 2, 12.0)


def test_resolved_shares_follow_flower():
    """``resolved_shares`` is ``SecAggPlusWorkflow.setup_stage``'s arithmetic."""
    from types import SimpleNamespace as NS

    from mira.federated.flower.secagg import resolved_shares

    assert resolved_shares(NS(num_shares=3, reconstruction_threshold=2), 3) == (3, 2)
    assert resolved_shares(NS(num_shares=1, reconstruction_threshold=1), 5) == (5, 5)  # 1: all of them
    assert resolved_shares(NS(num_shares=0.5, reconstruction_threshold=0.6), 10) == (5, 3)
    assert resolved_shares(NS(num_shares=0.4, reconstruction_threshold=0.1), 10) == (5, 2)  # odd; threshold >= 2
    assert resolved_shares(NS(num_shares=0.1, reconstruction_threshold=0.5), 10) == (10, 5)  # too few: all


# -- the protocol in one process ---------------------------------------------------------------
def _transfer(msg, mid: str):
    """``msg`` as the other end receives it: deflated to Flower's objects and inflated again."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    out = inflate_object_from_contents(msg.object_id, {k: o.deflate() for k, o in get_all_nested_objects(msg).items()})
    out.metadata.__dict__["_message_id"] = mid  # the SuperLink's job
    return out


class MemoryGrid:
    """Flower's ``Grid`` calls, answered at once by mira's ClientApp (with its mods), one Context
    per node kept across messages; a ClientApp exception becomes an error reply, as on a SuperNode."""

    def __init__(self, run_config: dict, n: int):
        from flwr.app import Context, RecordDict

        from mira.federated.flower.client_app import app

        self.app = app
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config=dict(run_config),
                                          node_config={"partition-id": i, "num-partitions": n}) for i in range(n)}
        self.replies: dict = {}
        self.types: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from flwr.app import Error, Message

        ids = []
        for m in messages:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            inbound = _transfer(m, mid)
            self.types.append(inbound.metadata.message_type)
            try:
                reply = self.app(inbound, self.contexts[inbound.metadata.dst_node_id])
            except Exception as e:  # noqa: BLE001
                reply = Message(Error(code=2, reason=f"{type(e).__name__}: {e}"), reply_to=inbound)
            self.replies[mid] = _transfer(reply, uuid.uuid4().hex)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture
def in_memory(monkeypatch, tmp_path):
    """``run(raw) -> (run dir, grid, uploads)``; ``uploads[round][client] = (n_train, adapter)``
    as each node handed it to the SecAgg+ mod (and ``starts`` what it trained from)."""
    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

    from mira.federated.flower import bundle
    from mira.federated.flower.node import NodeRuntime
    from mira.federated.flower.server import run_server
    from mira.federated.flower.settings import RunSettings

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1 if attr == "_run_id" else 0)
    uploads: dict[int, dict] = {}
    starts: dict[int, dict] = {}
    real = NodeRuntime.fit_arrays

    def spy(self, task, arrays):
        keys = self.wire_keys(task.keys)
        starts.setdefault(task.rnd, {})[self.spec.partition_id] = {k: torch.from_numpy(np.array(a))
                                                                   for k, a in zip(keys, arrays)}
        out, metrics = real(self, task, arrays)
        uploads.setdefault(task.rnd, {})[self.spec.partition_id] = (
            metrics["n_train"], {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, out)})
        return out, metrics

    monkeypatch.setattr(NodeRuntime, "fit_arrays", spy)

    def run(raw: dict, name: str, n: int = N_CLIENTS):
        uploads.clear()
        starts.clear()
        out = tmp_path / name
        rc = {"mira-config": bundle.config_text(raw), **RunSettings(out_dir=str(out), poll=0.01).to_run_config()}
        grid = MemoryGrid(rc, n)
        run_server(grid, rc)
        return out, grid, {r: dict(u) for r, u in uploads.items()}, {r: dict(s) for r, s in starts.items()}

    return run


def _global(run_dir) -> dict:
    from mira.federated.engine import load_checkpoint

    return load_checkpoint(run_dir / "checkpoint.pt")["strategy"]["global"]


UNEVEN = {"partition": {"name": "dirichlet", "num_clients": 3, "alpha": 2.0, "test_size": 2},
          "data": {"max_per_task": 12}}


def test_secagg_mean_is_the_weighted_mean_of_the_uploads(in_memory):
    """fedit, 2 rounds, clients of different sizes: each round's SecAgg+ mean (what the next
    round starts from, and the final global adapter) is the n_train-weighted mean of that round's
    uploads within ``bound``; rounds.json shows the four SecAgg+ stages and the metrics."""
    out, grid, uploads, starts = in_memory(fedit_cfg(secagg={}, **UNEVEN), "sa")
    rounds, summary = read_json(out / "rounds.json"), read_json(out / "summary.json")
    sizes = [c["n_train"] for c in sorted(summary["clients"], key=lambda c: c["id"])]
    assert len(set(sizes)) > 1, sizes  # the weights matter
    bound = bound_of(sizes, max_weight=max(sizes))
    final = _global(out)
    for rnd in (1, 2):
        mean = weighted_mean(uploads[rnd])
        got = starts[2][0] if rnd == 1 else {k: final[k] for k in mean}
        assert dmax(got, mean) < bound + FLOAT32, rnd
        e = rounds[rnd - 1]["secure_aggregation"]
        assert e["error_bound"] == pytest.approx(bound)
        assert [s["stage"] for s in e["stages"]] == STAGES
        assert all(s["nodes"] == s["replies"] == 3 for s in e["stages"])
        assert e["aggregated"] == [0, 1, 2] and e["clipped_values"] == 0
        assert sorted(rounds[rnd - 1]["train_loss"]) == ["0", "1", "2"]
        assert "fedavg_error_mean" not in rounds[rnd - 1]  # needs individual uploads
    # every node started round 2 from the same adapter
    assert all(dmax(starts[2][c], starts[2][0]) == 0 for c in range(3))
    assert summary["secure_aggregation"]["rounds"] == 2 and summary["secure_aggregation"]["max_weight"] == max(sizes)
    # Flower's workflow drove it: 4 plain `train` messages per node per round, no mira_fit
    assert grid.types.count("train") == 4 * 3 * 2 and "train.mira_fit" not in grid.types
    assert summary["flower"]["fit_messages"] == 4 * 3 * 2


@pytest.mark.parametrize("name", ["ffa_lora", "fedprox", "fedavgm"])
def test_other_sum_only_strategies(in_memory, name):
    """One round each (FFA-LoRA sends only B, FedProx a mu, FedAvgM steps a server optimiser on
    the mean: with momentum's first step and server_lr 1 that is the mean itself)."""
    out, _, uploads, _ = in_memory(fedit_cfg(algorithm=name, secagg={}, federation={"rounds": 1}), name)
    mean = weighted_mean(uploads[1])
    g = _global(out)
    assert dmax({k: g[k] for k in mean}, mean) < bound_of([12, 12, 12]) + FLOAT32
    if name == "ffa_lora":
        assert all("lora_B" in k for k in mean)


def test_a_client_that_drops_out_is_left_out_of_the_sum(in_memory, monkeypatch):
    """Client 2's update has NaN values: its node does not upload it (the server could not reject
    it after aggregation), SecAgg+ recovers the other two clients' masks, and the round's mean is
    theirs; client 2 is listed as failed and rejected."""
    import numpy as np

    from mira.federated.flower.node import NodeRuntime

    spy = NodeRuntime.fit_arrays

    def broken(self, task, arrays):
        out, metrics = spy(self, task, arrays)
        if self.spec.partition_id == 2 and task.rnd == 1:
            out = [np.full_like(a, np.nan) for a in out]
        return out, metrics

    monkeypatch.setattr(NodeRuntime, "fit_arrays", broken)
    out, _, uploads, _ = in_memory(fedit_cfg(secagg={}, federation={"rounds": 1}), "drop")
    e = read_json(out / "rounds.json")[0]
    assert e["failed"] == [2] and e["rejected"] == [2] and e["secure_aggregation"]["aggregated"] == [0, 1]
    stages = {s["stage"]: s for s in e["secure_aggregation"]["stages"]}
    assert stages["collect_masked_vectors"]["replies"] == 2 and stages["unmask"]["nodes"] == 2
    mean = weighted_mean({c: uploads[1][c] for c in (0, 1)})
    g = _global(out)
    assert dmax({k: g[k] for k in mean}, mean) < bound_of([12, 12]) + FLOAT32
    assert "NaN/Inf" in read_json(out / "summary.json")["flower"]["failed_updates"][0]["reason"]


# -- a real federation ---------------------------------------------------------------------------
def _round1_checkpoint(run_dir, keep, deadline: float):
    """Copy ``checkpoint.pt`` when round 1 has written it (round 2 then runs for seconds)."""
    from mira.federated.engine import load_checkpoint

    ck = run_dir / "checkpoint.pt"
    while not ck.exists():
        assert time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.05)
    shutil.copy(ck, keep)
    state = load_checkpoint(keep)
    assert state["round"] == 1, "missed the round-1 checkpoint"
    return state


@pytest.mark.slow
def test_secagg_on_three_supernodes_gives_the_plain_aggregate(federations, tmp_path):
    """fedit, 2 rounds, 3 warm SuperNodes on 127.0.0.1, once without and once with SecAgg+ (same
    seed and config). Round 1: the same start and seeds give the same uploads, so the two runs'
    global adapters are the aggregate of the same uploads with and without SecAgg+: equal within
    ``bound``. Round 2: the SecAgg run's final adapter equals, within ``bound``, the plain
    aggregate of its own round-2 uploads (the in-process engine continuing from its round-1
    checkpoint retrains exactly those). The SecAgg run's rounds.json shows the four stages."""
    from mira.config import validate
    from mira.federated.engine import Engine, Workspace
    from mira.federated.flower import bundle
    from mira.federated.flower.settings import RunSettings
    from mira.report.progress import NullProgress

    fed = federations()
    fed.start_superlink()
    fed.start_supernodes(N_CLIENTS, warm=True)
    runs, first = {}, {}
    for name, secagg in (("plain", None), ("secagg", {})):
        out = tmp_path / name
        run_id = fed.submit(bundle.config_text(fedit_cfg(secagg=secagg)), RunSettings(out_dir=str(out)))
        first[name] = _round1_checkpoint(out, tmp_path / f"{name}_round1.pt", time.monotonic() + 400)
        info = fed.wait(run_id, timeout=400)
        assert info["status"] == "finished:completed", fed.logs(run_id)[-4000:]
        runs[name] = out

    s_dir = runs["secagg"]
    rounds, summary = read_json(s_dir / "rounds.json"), read_json(s_dir / "summary.json")
    sizes = [c["n_train"] for c in sorted(summary["clients"], key=lambda c: c["id"])]
    bound = bound_of(sizes)  # 2 * 8 / 2^22 = 3.8e-6 (equal sizes)
    assert bound == pytest.approx(16 / 2**22)
    for e in rounds:
        sa = e["secure_aggregation"]
        assert [s["stage"] for s in sa["stages"]] == STAGES and sa["aggregated"] == [0, 1, 2]
        assert all(s["nodes"] == s["replies"] == 3 for s in sa["stages"])
        assert sa["error_bound"] == pytest.approx(bound) and e["failed"] == []
    assert summary["secure_aggregation"]["rounds"] == 2 and summary["runtime"] == "flower"
    assert "fit round 2 (SecAgg+)" in fed.procs["supernode_0"].text()

    # round 1: the same uploads aggregated with and without SecAgg+
    g_plain, g_sa = first["plain"]["strategy"]["global"], first["secagg"]["strategy"]["global"]
    d1 = dmax(g_plain, g_sa)
    assert 0 < d1 < bound + FLOAT32, d1  # > 0: it did go through the quantiser

    # round 2: the plain aggregate of the SecAgg run's round-2 uploads
    cfg = validate(fedit_cfg())
    engine = Engine(Workspace.load(cfg), cfg, tmp_path / "engine_round2", quiet=True)
    engine.load_state(first["secagg"])
    engine.run_round(2, NullProgress())
    d2 = dmax(engine.strategy.global_adapter, _global(s_dir))
    assert d2 < bound + FLOAT32, d2
    # the plain Flower run itself went on from a slightly different round-1 adapter
    plain = read_json(runs["plain"] / "summary.json")
    assert summary["mean_local_test_loss"] == pytest.approx(plain["mean_local_test_loss"], abs=1e-3)
    print(f"round 1: {d1:.2e}, round 2: {d2:.2e} (bound {bound:.2e}); round times: plain "
          f"{[round(e['round_time_s'], 1) for e in read_json(runs['plain'] / 'rounds.json')]}, SecAgg+ "
          f"{[round(e['round_time_s'], 1) for e in rounds]}")
