"""Safe defaults of the Flower runtime (issue 14), without starting Flower processes:

* client identity: a partition is bound to the first node that claims it; a takeover while
  the owner is online is refused, a re-binding after it went offline is logged and recorded;
* evaluation: each node receives only its own adapter unless ``cross-eval`` is set;
* keys: private keys created 0600, kept out of run directories and workdirs;
* the SuperLink listens on 127.0.0.1 by default and refuses an exposed address without TLS
  and node authentication unless ``--insecure`` says so;
* faults: finite round/straggler timeouts, a strict-majority quorum, partial rounds and
  evaluations flagged in ``rounds.json`` and ``summary.json``.

The in-process runs use ``test_secagg.MemoryGrid``: mira's real ClientApp answering the
``FlowerEngine``'s messages in this process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from mira.errors import MiraError

from .conftest import N_CLIENTS, flower_cfg, read_json
from .test_secagg import MemoryGrid


@pytest.fixture
def task_identity(monkeypatch):
    """What a ServerApp process has set before it builds ``Message``s."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1 if attr == "_run_id" else 0)


# -- client identity: Fleet with a scripted grid --------------------------------------------------
class HelloGrid:
    """Answers ``hello`` with each node's claimed partition; ``online`` is set by the test."""

    def __init__(self, claims: dict[int, int], k: int = 3):
        self.claims, self.k = dict(claims), k
        self.online = set(claims)
        self.replies: dict[str, object] = {}
        self.n = 0

    def get_node_ids(self):
        return sorted(self.online)

    def push_messages(self, msgs):
        from mira.federated.flower.protocol import hello_reply

        ids = []
        for m in msgs:
            self.n += 1
            mid = f"m{self.n}"
            node = m.metadata.dst_node_id
            info = {"partition_id": self.claims[node], "num_partitions": self.k, "task": "t", "n_train": 4,
                    "n_test": 2}
            self.replies[mid] = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid),
                                                has_error=lambda: False, content=hello_reply(info))
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def test_a_bound_partition_is_not_taken_over_while_its_owner_is_online(monkeypatch, task_identity):
    from mira.federated.flower import server
    from mira.federated.flower.settings import RunSettings

    monkeypatch.setattr(server, "payload_bytes", lambda m: 0)
    grid = HelloGrid({10: 0, 11: 1, 12: 2})
    lines: list[str] = []
    fleet = server.Fleet(grid, RunSettings(poll=0.01, node_wait=5.0), log=lines.append)
    fleet.discover()
    assert fleet.node_of == {0: 10, 1: 11, 2: 12}

    # a 4th node claims partition 0 while node 10 is online: refused, logged, nothing moves
    grid.claims[13] = 0
    grid.online.add(13)
    fleet.round = 2
    fleet.refresh(wait=1.0)
    assert fleet.node_of == {0: 10, 1: 11, 2: 12} and fleet.rebindings == []
    assert 13 in fleet.bad and any("node 13 refused" in x and "takeover refused" in x for x in lines)
    fleet.refresh(wait=1.0)  # not asked again while the owner is online
    assert fleet.node_of[0] == 10

    # a claim outside [0, K) is ignored
    grid.claims[14] = 7
    grid.online.add(14)
    fleet.refresh(wait=1.0)
    assert 14 in fleet.bad and 14 not in fleet.node_of.values()

    # the owner goes offline: the waiting node may now take partition 0, and that is recorded
    grid.online.discard(10)
    fleet.round = 3
    fleet.refresh(wait=1.0)
    assert fleet.node_of[0] == 13
    (rb,) = fleet.rebindings
    assert (rb["client"], rb["from_node"], rb["to_node"], rb["round"]) == (0, 10, 13, 3)
    assert rb["reason"] == "node 10 went offline"
    assert any("client 0 re-bound from node 10 to node 13: node 10 went offline" in x for x in lines)


# -- in-process runs over mira's ClientApp ---------------------------------------------------------
class SwapGrid(MemoryGrid):
    """``MemoryGrid`` in which, once round 1's checkpoint exists, node 100 (client 0) is gone and
    node 103 claims partition 0; node 104 claims partition 1 while its owner (101) is online."""

    def __init__(self, run_config: dict, n: int, out: Path):
        from flwr.app import Context, RecordDict

        super().__init__(run_config, n)
        self.out = out
        self.late = {nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config=dict(run_config),
                                  node_config={"partition-id": pid, "num-partitions": n})
                     for nid, pid in ((103, 0), (104, 1))}
        self.swapped = False

    def get_node_ids(self):
        if not self.swapped and (self.out / "checkpoint.pt").exists():
            self.swapped = True
            del self.contexts[100]
            self.contexts.update(self.late)
        return list(self.contexts)


@pytest.fixture
def memory_run(task_identity, tmp_path):
    from mira.federated.flower import bundle
    from mira.federated.flower.server import run_server
    from mira.federated.flower.settings import RunSettings

    def run(raw: dict, name: str, grid_class=MemoryGrid, **settings):
        out = tmp_path / name
        rc = {"mira-config": bundle.config_text(raw),
              **RunSettings(out_dir=str(out), poll=0.01, **settings).to_run_config()}
        grid = grid_class(rc, N_CLIENTS, out) if grid_class is SwapGrid else grid_class(rc, N_CLIENTS)
        run_server(grid, rc)
        return out, grid

    return run


def test_personalised_evaluation_sends_each_node_only_its_own_adapter(memory_run, monkeypatch):
    """mira (one adapter per client), default settings, with faults: client 2's fit fails in
    round 2 and its evaluation fails; client 0's node is replaced after round 1 and another node
    tries to take client 1. Each evaluation message holds one adapter; the global loss is not
    computed (null, and said so); the partial round and evaluation are flagged; the re-binding is
    recorded and the takeover refused."""
    from mira.federated.flower.node import NodeRuntime

    fit, evaluate = NodeRuntime.fit, NodeRuntime.evaluate
    seen: list[int] = []

    def failing_fit(self, task):
        if self.spec.partition_id == 2 and task.rnd == 2:
            raise RuntimeError("disk on fire")
        return fit(self, task)

    def failing_eval(self, bufs, own):
        seen.append(len(bufs))
        if self.spec.partition_id == 2:
            raise RuntimeError("no test set today")
        return evaluate(self, bufs, own)

    monkeypatch.setattr(NodeRuntime, "fit", failing_fit)
    monkeypatch.setattr(NodeRuntime, "evaluate", failing_eval)
    out, grid = memory_run(flower_cfg(), "own", grid_class=SwapGrid)
    assert grid.swapped
    assert seen == [1] * N_CLIENTS  # every node got exactly one adapter: its own

    s = read_json(out / "summary.json")
    fl = s["flower"]
    assert fl["cross_eval"] is False and fl["eval_messages"] == N_CLIENTS
    assert fl["eval_bytes_down"] / fl["eval_messages"] < 1.5 * s["adapter_bytes"]
    assert s["mean_global_test_loss"] is None and "not computed" in s["global_loss"]
    assert all(c["global_test_loss"] is None for c in s["clients"])
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))

    rounds = read_json(out / "rounds.json")
    assert [e["partial"] for e in rounds] == [False, True]
    assert rounds[1]["failed"] == [2] and rounds[1]["aggregated"] == 2
    assert rounds[1]["eval_partial"] is True and rounds[1]["eval_failed"] == [2]
    assert s["partial_rounds"] == [2] and s["partial_evaluations"] == [2]

    assert fl["nodes"] == {"0": 103, "1": 101, "2": 102}  # 104's takeover of client 1 was refused
    (rb,) = fl["rebindings"]
    assert (rb["client"], rb["from_node"], rb["to_node"], rb["round"]) == (0, 100, 103, 2)
    assert "went offline" in rb["reason"]


def test_cross_evaluation_is_opt_in_and_gives_the_engines_global_loss(memory_run, reference):
    out, _ = memory_run(flower_cfg(), "cross", cross_eval=True)
    s, r = read_json(out / "summary.json"), read_json(reference[2] / "summary.json")
    assert s["flower"]["cross_eval"] is True and "global_loss" not in s
    assert s["mean_global_test_loss"] == pytest.approx(r["mean_global_test_loss"], abs=1e-5)
    assert s["flower"]["eval_bytes_down"] / s["flower"]["eval_messages"] > 2.5 * s["adapter_bytes"]
    assert s["partial_rounds"] == [] and s["partial_evaluations"] == []


def test_a_shared_global_adapter_still_gives_the_global_loss(memory_run):
    """fedit: one adapter for all clients, which each node receives anyway; no cross-eval needed."""
    raw = flower_cfg(federation={"rounds": 1})
    raw["algorithm"] = {"name": "fedit"}
    out, _ = memory_run(raw, "fedit")
    s = read_json(out / "summary.json")
    assert isinstance(s["mean_global_test_loss"], float) and "global_loss" not in s


def test_the_default_quorum_is_a_strict_majority(memory_run, monkeypatch):
    """federation.min_clients=1 (its default), 2 of 3 clients fail: the round stops the run."""
    from mira.federated.flower.node import NodeRuntime

    fit = NodeRuntime.fit

    def failing_fit(self, task):
        if self.spec.partition_id > 0:
            raise RuntimeError("gone")
        return fit(self, task)

    monkeypatch.setattr(NodeRuntime, "fit", failing_fit)
    with pytest.raises(MiraError, match="1 of 3 sampled clients replied, fewer than the quorum of 2"):
        memory_run(flower_cfg(federation={"rounds": 1}), "quorum")


def test_fault_defaults_are_finite_and_the_quorum_a_majority():
    from mira.federated.flower.settings import RunSettings, majority

    s = RunSettings()
    assert 0 < s.round_timeout < 12 * 3600 and s.straggler_timeout >= 0 and s.min_clients == 0
    assert s.cross_eval is False
    assert [majority(n) for n in (0, 1, 2, 3, 4, 8)] == [0, 1, 2, 2, 3, 5]
    assert (s.quorum(3), s.quorum(3, floor=3), RunSettings(min_clients=1).quorum(3)) == (2, 3, 1)
    assert RunSettings.from_run_config({"min-clients": "2", "cross-eval": "true"}).quorum(8) == 2
    with pytest.raises(MiraError):
        RunSettings.from_run_config({"min-clients": -1})


# -- keys --------------------------------------------------------------------------------------------
def test_private_keys_are_created_0600_whatever_the_umask(tmp_path):
    from mira.federated.flower.certs import generate_all

    old = os.umask(0)  # the worst case: files would be created 0666
    try:
        files = generate_all(tmp_path / "keys", nodes=1)
    finally:
        os.umask(old)
    folder = tmp_path / "keys"
    assert (folder.stat().st_mode & 0o777) == 0o700
    for name in ("ca.key", "server.key", "supernode_0"):
        assert ((folder / name).stat().st_mode & 0o777) == 0o600, name
    assert ((folder / "supernode_0.pub").stat().st_mode & 0o077) != 0  # public parts stay readable
    # overwriting replaces the file (a fresh 0600 one), even one that was made world-readable
    (folder / "ca.key").chmod(0o644)
    generate_all(folder, nodes=0, overwrite=True)
    assert ((folder / "ca.key").stat().st_mode & 0o777) == 0o600
    assert files["ca"].exists()


def test_keys_never_go_into_a_run_directory(tmp_path):
    from mira.federated.flower.certs import generate_all
    from mira.federated.flower.launch import LocalFederation

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    for where in (run, run / "certs"):
        with pytest.raises(MiraError, match="run directory"):
            generate_all(where, nodes=1)
    # a local federation's test CA lives in its own owner-only folder, outside the workdir, and goes with it
    fed = LocalFederation(run / "flower", tls=True)
    try:
        assert fed.workdir not in fed.certs.parents and run not in fed.certs.parents
        assert (fed.certs / "server.key").exists() and (fed.certs.stat().st_mode & 0o777) == 0o700
        assert not list(run.rglob("*.key"))
    finally:
        fed.close()
    assert not fed.certs.exists()
    with pytest.raises(MiraError, match="out of the federation's workdir"):
        LocalFederation(tmp_path / "w", tls=True, keys_dir=tmp_path / "w" / "certs")


# -- the SuperLink's address ---------------------------------------------------------------------------
def test_superlink_listens_on_loopback_and_refuses_an_exposed_address_without_tls_and_auth(tmp_path):
    from typer.testing import CliRunner

    from mira.federated.flower.certs import generate_ca_and_server
    from mira.federated.flower.cli import flower_app, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))
    certs = tmp_path / "certs"
    generate_ca_and_server(certs)
    runner = CliRunner()

    def run(*args):
        return runner.invoke(flower_app, ["superlink", "--dry-run", *args])

    r = run("--insecure")
    assert r.exit_code == 0 and "--host 127.0.0.1" in r.output  # the default: loopback only
    for args, missing in ((["--certs", str(certs)], "node authentication"),
                          (["--certs", str(certs), "--host", "10.0.0.5"], "node authentication"),
                          ([], "TLS")):
        r = run("--host", "0.0.0.0", *args) if "--host" not in args else run(*args)
        assert isinstance(r.exception, MiraError) and missing in str(r.exception), (args, r.output)
        assert "--insecure" in str(r.exception)
    r = run("--host", "0.0.0.0", "--certs", str(certs), "--auth")
    assert r.exit_code == 0 and "--enable-supernode-auth" in r.output
    r = run("--host", "0.0.0.0", "--insecure")  # said explicitly: allowed, with a warning
    assert r.exit_code == 0 and "warning" in r.output and "--insecure" in r.output


def test_a_run_whose_rounds_would_not_fit_in_server_memory_is_refused_before_round_1(memory_run, monkeypatch):
    """The ServerApp estimates a round's memory from the adapter size and the number of clients
    (the copies measured by benchmarks/flower_memory.py, plus what a personalised strategy and
    cross-evaluation hold) and refuses, in one line naming lora and the figures, a run that would
    exceed the memory available, before any fit message."""
    from mira.errors import MiraError
    from mira.federated.flower import server

    base = server.server_memory_copies(4)
    assert base == pytest.approx(server.SERVER_COPIES_FIXED + 4 * server.SERVER_COPIES_PER_CLIENT)
    assert server.server_memory_copies(4, personalized=True) == pytest.approx(base + 8)
    assert server.server_memory_copies(4, personalized=True, cross_eval=True) == pytest.approx(base + 8 + 16)
    need = 10**8 * base
    assert server.check_server_memory(10**8, 4, available=int(need / server.MEMORY_HEADROOM) + 1) == need
    assert server.check_server_memory(10**8, 4, available=None) == need  # unknown: not refused
    with pytest.raises(MiraError, match=rf"about {need / 1e9:.1f} GB on the server \(100 MB float32 adapter x "
                                        r"[\d.]+ copies for 4 clients\).* of the 1\.0 GB available"):
        server.check_server_memory(10**8, 4, available=10**9)

    sent = []
    real = MemoryGrid.push_messages
    monkeypatch.setattr(MemoryGrid, "push_messages", lambda self, ms: sent.extend(ms := list(ms)) or real(self, ms))
    monkeypatch.setattr(server, "mem_available", lambda: 10**5)  # 100 kB: not even one demo adapter round
    with pytest.raises(MiraError, match="personalised.* more than 90% of the 0.0 GB available; lower lora.r") as e:
        memory_run(flower_cfg(), "oom")  # mira: personalised
    assert e.value.where == "lora"
    assert {m.metadata.message_type for m in sent} == {"query.mira_hello"}  # the nodes were asked; no fit went out
