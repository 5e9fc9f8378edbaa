"""Real federations on Flower (1.42 installed): a SuperLink and SuperNodes as separate processes on
127.0.0.1, a run submitted with ``flwr run``, compared with the in-process engine."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from .conftest import ATOL, N_CLIENTS, flower_cfg, load_adapters, max_diff, read_json, run_and_wait

pytestmark = pytest.mark.slow


def test_three_supernodes_match_the_in_process_engine(federations, reference, tmp_path):
    """2 rounds of mira, each client on its own SuperNode: the same adapters, losses and
    byte counts as ``mira run``. The evaluation runs with the opt-in ``cross-eval`` (every node
    evaluates every adapter), which the engine's global test loss needs. Client 2's ClientApp is Flower's default (a fresh process
    per message that loads the model and calls ``client_fit``); clients 0 and 1 forward to
    a warm worker running the same code (to keep the test short)."""
    fed = federations()
    fed.start_superlink()
    fed.start_supernodes(N_CLIENTS, warm=[True, True, False])
    out = tmp_path / "run"
    info = run_and_wait(fed, flower_cfg(), out, cross_eval=True)

    ref = reference[2]
    flw, eng = load_adapters(out), load_adapters(ref)
    for c in range(N_CLIENTS):
        assert max_diff(flw[c], eng[c]) <= ATOL, f"client {c}"

    s, r = read_json(out / "summary.json"), read_json(ref / "summary.json")
    assert s["runtime"] == "flower" and s["rounds"] == 2
    assert s["mean_local_test_loss"] == pytest.approx(r["mean_local_test_loss"], abs=1e-6)
    # global loss: per-node sums combined on the server instead of one pass over the union
    assert s["mean_global_test_loss"] == pytest.approx(r["mean_global_test_loss"], abs=1e-5)
    assert (s["bytes_up"], s["bytes_down"]) == (r["bytes_up"], r["bytes_down"])
    assert [c["id"] for c in s["clients"]] == [c["id"] for c in r["clients"]]

    # the same run directory as `mira run`
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "rounds.json", "graph.npy", "checkpoint.pt"):
        assert (out / name).exists(), name
    assert (out / "adapters" / "client_0" / "adapter_config.json").exists()
    rounds, ref_rounds = read_json(out / "rounds.json"), read_json(ref / "rounds.json")
    assert set(ref_rounds[0]) <= set(rounds[0]), "the Flower round log lost keys the engine writes"
    assert [e["sampled"] for e in rounds] == [e["sampled"] for e in ref_rounds]
    assert all(e["failed"] == [] and e["partial"] is False and e.get("eval_partial", False) is False for e in rounds)
    assert s["partial_rounds"] == [] and s["partial_evaluations"] == [] and s["flower"]["rebindings"] == []
    assert "] fit round 2 in" in fed.procs["supernode_2"].text()
    assert "(cold)" in fed.procs["supernode_2"].text() and "(warm worker)" in fed.procs["supernode_0"].text()

    # what Flower moved: one fit message per client per round, each a little above the adapter
    fl = s["flower"]
    assert fl["fit_messages"] == 2 * N_CLIENTS and fl["failed_updates"] == []
    per_msg = fl["fit_bytes_down"] / fl["fit_messages"]
    assert s["adapter_bytes"] < per_msg < s["adapter_bytes"] + 4096
    assert info["network-traffic"]["total-bytes"] > fl["fit_bytes_down"] + fl["fit_bytes_up"]


def test_tls_and_node_auth(federations, reference, tmp_path):
    """TLS (test CA) and SuperNode authentication: registered nodes federate (1 round, warm
    workers) and match the engine; a SuperNode with an unregistered key is refused."""
    fed = federations(tls=True, auth=True)
    fed.start_superlink()
    fed.start_supernodes(N_CLIENTS, warm=True)
    rogue_key = fed.node_key(99, registered=False)
    rogue = fed.start_supernode(0, N_CLIENTS, key=rogue_key, name="rogue")
    out = tmp_path / "run"
    run_and_wait(fed, flower_cfg(federation={"rounds": 1}), out)

    # the unregistered node was turned away and gave up (Flower exit code 305)
    deadline = time.monotonic() + 60
    while rogue.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not rogue.alive()
    assert rogue.popen.returncode != 0
    assert "Failed to activate SuperNode" in rogue.text()
    assert "No SuperNode found with the given public key" in fed.procs["superlink"].text()

    s = read_json(out / "summary.json")
    assert sorted(s["flower"]["nodes"].values()) == sorted(fed.registered.values())
    # default evaluation: each node got only its own adapter, so mira's global loss is not computed
    assert s["mean_global_test_loss"] is None and s["flower"]["cross_eval"] is False
    assert s["flower"]["eval_bytes_down"] / s["flower"]["eval_messages"] < 1.5 * s["adapter_bytes"]
    flw, eng = load_adapters(out), load_adapters(reference[1])
    for c in range(N_CLIENTS):
        assert max_diff(flw[c], eng[c]) <= ATOL, f"client {c}"
    assert s["mean_local_test_loss"] == pytest.approx(read_json(reference[1] / "summary.json")["mean_local_test_loss"],
                                                      abs=1e-6)

    # the keys, after a real TLS + auth run: in their own owner-only folder, private keys 0600, and
    # no private key anywhere in the run directory or the federation's workdir (logs, Flower homes)
    import stat

    keys = fed.certs
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700 and keys not in out.parents and keys not in fed.workdir.parents
    private = [f for f in keys.iterdir() if f.is_file() and b"PRIVATE KEY" in f.read_bytes()]
    assert len(private) >= N_CLIENTS + 2  # the CA's, the SuperLink's, each node's (and the rogue's)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in private), [(f.name, oct(f.stat().st_mode)) for f in private]
    leaked = [f for root in (out, fed.workdir) for f in root.rglob("*")
              if f.is_file() and not f.is_symlink() and f.stat().st_size < 10**6 and b"PRIVATE KEY" in f.read_bytes()]
    assert leaked == []


def test_killed_supernode_is_left_out_and_keeps_its_adapter(federations, reference, tmp_path):
    """SIGKILL client 2's SuperNode (with its worker and ClientApp) when round 2 starts: with the
    default quorum (a strict majority, 2 of 3) rounds 2 and 3 complete with clients 0 and 1, flagged
    partial, the run finishes, and the server keeps client 2's adapter from round 1. At the same
    moment a 4th SuperNode claims partition 0 while client 0's node is alive: the server refuses
    the takeover (and logs it), and client 0 stays on its node."""
    fed = federations()
    fed.start_superlink()
    fed.start_supernodes(N_CLIENTS, warm=True)
    out = tmp_path / "run"
    from mira.federated.flower import bundle
    from mira.federated.flower.settings import RunSettings

    run_id = fed.submit(bundle.config_text(flower_cfg(federation={"rounds": 3})),
                        RunSettings(out_dir=str(out), straggler_timeout=5.0, round_timeout=300.0))
    deadline = time.monotonic() + 400
    while not (out / "checkpoint.pt").exists():  # written when round 1 ends; round 2 starts at once
        assert time.monotonic() < deadline, fed.logs(run_id)[-3000:]
        time.sleep(0.1)
    victims = fed.group_pids("supernode_2")
    fed.kill("supernode_2", signal.SIGKILL)
    fed.start_supernode(0, N_CLIENTS, name="impostor_0")  # a second node saying it is client 0
    assert victims and not any(os.path.exists(f"/proc/{p}") and _running(p) for p in victims)

    info = fed.wait(run_id, timeout=400)
    assert info["status"] == "finished:completed", fed.logs(run_id)[-4000:]
    rounds = read_json(out / "rounds.json")
    assert rounds[0]["failed"] == [] and rounds[1]["failed"] == [2] and rounds[1]["sampled"] == [0, 1, 2]
    assert [e["partial"] for e in rounds] == [False, True, True] and rounds[1]["aggregated"] == 2
    assert rounds[1]["eval_partial"] is True and rounds[1]["eval_failed"] == [2]
    s = read_json(out / "summary.json")
    assert s["rounds"] == 3
    assert s["partial_rounds"] == [2, 3] and s["partial_evaluations"] == [2, 3]
    assert [f["client"] for f in s["flower"]["failed_updates"]] == [2, 2]
    assert sorted(c["id"] for c in s["clients"]) == [0, 1]  # client 2 could not be evaluated
    log = fed.logs(run_id)
    refused = re.search(r"node (\d+) refused: claims partition-id=0, which is bound to node (\d+), still online", log)
    assert refused and "takeover refused" in log, log[-3000:]
    assert s["flower"]["nodes"]["0"] == int(refused.group(2)) != int(refused.group(1))
    assert s["flower"]["rebindings"] == []

    flw, round1 = load_adapters(out), load_adapters(reference[1])
    assert max_diff(flw[2], round1[2]) <= ATOL  # the killed client's last adapter is kept
    assert max_diff(flw[0], round1[0]) > 1e-4  # the others trained on in round 2

    assert fed.close(grace=2.0) == []  # nothing survives, the killed node's children included


def test_a_node_that_left_may_be_replaced_and_the_rebinding_is_recorded(federations, tmp_path):
    """After round 1 a new SuperNode says it is client 1 (registered, online); then client 1's own
    SuperNode shuts down (SIGTERM: it leaves the SuperLink). Once the owner is offline, and only
    then, the server binds partition 1 to the new node, logs why, records it in summary.json, and
    the new node serves client 1 to the end."""
    fed = federations()
    fed.start_superlink()
    fed.start_supernodes(N_CLIENTS, warm=True)
    out = tmp_path / "run"
    from mira.federated.flower import bundle
    from mira.federated.flower.settings import RunSettings

    run_id = fed.submit(bundle.config_text(flower_cfg(federation={"rounds": 10})),
                        RunSettings(out_dir=str(out), straggler_timeout=30.0, round_timeout=300.0))
    deadline = time.monotonic() + 400
    while not (out / "checkpoint.pt").exists():
        assert time.monotonic() < deadline, fed.logs(run_id)[-3000:]
        time.sleep(0.1)
    new = fed.start_supernode(1, N_CLIENTS, name="replacement_1", warm=True)
    while "SuperNode ID:" not in new.text():  # registered with the SuperLink
        assert time.monotonic() < deadline and new.alive(), new.text()[-2000:]
        time.sleep(0.2)
    owner_left = int(read_json(out / "rounds.json")[-1]["round"]) if (out / "rounds.json").exists() else 1
    fed.kill("supernode_1", signal.SIGTERM)

    info = fed.wait(run_id, timeout=400)
    assert info["status"] == "finished:completed", fed.logs(run_id)[-4000:]
    s = read_json(out / "summary.json")
    log = fed.logs(run_id)
    assert len(s["flower"]["rebindings"]) == 1, "\n".join(x for x in log.splitlines() if "node" in x or "round" in x)
    (rb,) = s["flower"]["rebindings"]
    assert rb["client"] == 1 and rb["from_node"] != rb["to_node"] and "went offline" in rb["reason"]
    assert rb["round"] >= max(2, owner_left) and s["flower"]["nodes"]["1"] == rb["to_node"]
    assert f"client 1 re-bound from node {rb['from_node']} to node {rb['to_node']}: node {rb['from_node']} went offline" \
        in log, log[-3000:]
    assert sorted(c["id"] for c in s["clients"]) == [0, 1, 2]  # the new node evaluated client 1 at the end
    assert "] fit round 10 in" in new.text()
    assert fed.close(grace=2.0) == []


def test_a_stalled_supernode_is_left_out_after_the_straggler_timeout(federations, tmp_path):
    """SIGSTOP client 2's SuperNode (and its worker) after round 1: it is alive but answers
    nothing. Each later round waits for the quorum (2 of 3) and then the straggler timeout, leaves
    client 2 out, and is flagged partial; the run completes instead of hanging. SIGCONT lets
    the node go on, and nothing survives the federation's close."""
    fed = federations()
    fed.start_superlink()
    fed.start_supernodes(N_CLIENTS, warm=True)
    out = tmp_path / "run"
    from mira.federated.flower import bundle
    from mira.federated.flower.settings import RunSettings

    run_id = fed.submit(bundle.config_text(flower_cfg(federation={"rounds": 3})),
                        RunSettings(out_dir=str(out), straggler_timeout=5.0, round_timeout=300.0))
    deadline = time.monotonic() + 400
    while not (out / "checkpoint.pt").exists():
        assert time.monotonic() < deadline, fed.logs(run_id)[-3000:]
        time.sleep(0.1)
    t_stop = time.monotonic()
    fed.signal("supernode_2", signal.SIGSTOP)
    try:
        info = fed.wait(run_id, timeout=400)
        took = time.monotonic() - t_stop
    finally:
        fed.signal("supernode_2", signal.SIGCONT)
    assert info["status"] == "finished:completed", fed.logs(run_id)[-4000:]
    rounds = read_json(out / "rounds.json")
    assert [e["partial"] for e in rounds] == [False, True, True] and rounds[1]["failed"] == [2]
    s = read_json(out / "summary.json")
    assert s["partial_rounds"] == [2, 3] and took < 200
    assert fed.close(grace=2.0) == []


def test_flwr_stop_stops_the_compute_warm_and_cold_and_the_nodes_serve_on(federations, tmp_path):
    """A round of 10^6 local steps on 3 SuperNodes (2 warm, 1 cold), then ``flwr stop``: each
    SuperNode sees that the run no longer runs and marks its ClientApp task stopped, Flower refuses
    the ClientApp's next task heartbeat and stops it, and a warm worker cancels the compute (its
    log says so). Bounded: a forked ClientApp beats every ~4 s, Flower's own (cold) every ~20 s.
    The nodes stay up and serve the next run to the end."""
    fed = federations()
    fed.start_superlink()
    fed.start_supernodes(N_CLIENTS, warm=[True, True, False])
    from mira.federated.flower import bundle
    from mira.federated.flower.settings import RunSettings

    raw = flower_cfg(federation={"rounds": 1, "local_steps": 10**6}, algorithm={"eta": 0.02})
    run_id = fed.submit(bundle.config_text(raw), RunSettings(out_dir=str(tmp_path / "stopped"), round_timeout=3000.0))
    deadline = time.monotonic() + 300
    names = [f"supernode_{i}" for i in range(N_CLIENTS)]
    warm, cold = names[:2], names[2]
    while not all("train.mira_fit" in fed.procs[n].text() for n in names):  # every node got its fit message
        assert time.monotonic() < deadline, {n: fed.procs[n].text()[-1500:] for n in names}
        time.sleep(0.2)
    time.sleep(2.0)  # and is training
    assert not any("request cancelled" in fed.procs[n].text() for n in warm)
    assert fed.clientapp_running(cold)
    t_stop = time.monotonic()
    fed.stop(run_id)
    took = {}
    while len(took) < len(names):
        for n in names:
            done = ("fit request cancelled: its ClientApp went away" in fed.procs[n].text() if n in warm
                    else "Task stopped." in fed.procs[n].text() and not fed.clientapp_running(n))
            if done and n not in took:
                took[n] = time.monotonic() - t_stop
        assert time.monotonic() - t_stop < 90, (took, {n: fed.procs[n].text()[-1500:] for n in names})
        time.sleep(0.2)
    print("flwr stop -> compute stopped after (s):", {n: round(t, 1) for n, t in took.items()})
    assert max(took[n] for n in warm) < 30 and took[cold] < 90
    assert fed.wait(run_id, timeout=120)["status"] == "finished:stopped"
    for n in names:
        text = fed.procs[n].text()
        assert f"run {run_id} is no longer running at the SuperLink" in text, text[-2000:]
        assert fed.procs[n].alive() and not fed.clientapp_running(n)
    # the nodes are free again: a short run on the same SuperNodes completes
    out = tmp_path / "next"
    run_and_wait(fed, flower_cfg(federation={"rounds": 1}), out, timeout=300)
    assert read_json(out / "summary.json")["rounds"] == 1
    assert fed.close(grace=2.0) == []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def test_central_dp_on_flower_matches_the_in_process_engine(federations, tmp_path):
    """Central DP-FedAvg (Poisson sampling, clipping, seeded noise) on 3 SuperNodes: the server adds
    the same noise to the same clipped sum as ``mira run``, so the adapters and epsilon agree."""
    from mira.config import validate
    from mira.federated.engine import Engine, Workspace

    raw = flower_cfg(algorithm={"name": "fedit"}, federation={"fraction": 0.67},
                     privacy={"client": {"noise_multiplier": 0.8, "clip_norm": 0.5, "delta": 0.1}})
    raw["algorithm"] = {"name": "fedit"}
    cfg = validate(raw)
    ref = tmp_path / "ref"
    Engine(Workspace.load(cfg), cfg, ref, quiet=True).run()
    fed = federations()
    fed.start_superlink()
    fed.start_supernodes(N_CLIENTS, warm=[True, True, True])
    out = tmp_path / "run"
    run_and_wait(fed, raw, out)
    flw, eng = load_adapters(out), load_adapters(ref)
    for c in range(N_CLIENTS):
        assert max_diff(flw[c], eng[c]) <= ATOL, f"client {c}"
    s, r = read_json(out / "summary.json"), read_json(ref / "summary.json")
    assert s["privacy"] == r["privacy"] and s["privacy"]["client"]["epsilon"] > 0
    rounds, ref_rounds = read_json(out / "rounds.json"), read_json(ref / "rounds.json")
    assert [e["sampled"] for e in rounds] == [e["sampled"] for e in ref_rounds]
    assert [e["dp_noise_std"] for e in rounds] == [e["dp_noise_std"] for e in ref_rounds]


def test_superlink_restart_nodes_reconnect_and_the_run_resumes_to_the_same_adapters(federations, reference,
                                                                                    tmp_path):
    """Crash the SuperLink (SIGKILL, with its SuperExec and ServerApp) right after round 1's
    checkpoint, while round 2 runs; start it again on the same port. Flower's SuperNodes then exit
    (the new SuperLink does not know them); mira's supervisor restarts each one with logged back-off
    (warm and cold nodes alike), and ``mira flower run --resume RUN_DIR`` continues from the
    checkpoint: round 2 only, and the same adapters as the uninterrupted in-process run."""
    import subprocess
    import sys

    from mira.federated.flower import bundle
    from mira.federated.flower.launch import TAG
    from mira.federated.flower.settings import RunSettings

    fed = federations()
    fed.start_superlink()
    nodes = fed.start_supernodes(N_CLIENTS, warm=[True, True, False])
    out = tmp_path / "run"
    run_id = fed.submit(bundle.config_text(flower_cfg()), RunSettings(out_dir=str(out), cross_eval=True))
    deadline = time.monotonic() + 400
    while not (out / "checkpoint.pt").exists():  # round 1 done; round 2 starts at once
        assert time.monotonic() < deadline, fed.logs(run_id)[-3000:]
        time.sleep(0.1)
    assert not (out / "summary.json").exists()
    offsets = {n.name: n.log.stat().st_size for n in nodes}
    t_crash = time.monotonic()
    fed.crash_superlink()
    assert not any("flwr-serverapp" in " ".join(_cmdline(p)) for p in _tagged(fed)), "the ServerApp survived"
    fed.start_superlink()

    def since(n) -> str:
        with open(n.log, "rb") as f:
            f.seek(offsets[n.name])
            return f.read().decode(errors="replace")

    while not all(since(n).count("SuperNode ID:") >= 1 for n in nodes):  # re-registered with the new SuperLink
        assert time.monotonic() - t_crash < 120, {n.name: since(n)[-1500:] for n in nodes}
        time.sleep(0.5)
    reconnect_s = time.monotonic() - t_crash
    for n in nodes:
        assert n.alive(), n.text()[-2000:]  # the supervisor, still the same process
        assert re.search(r"\[mira supervisor .*\] the SuperNode exited with code 0 after .*; restart 1 of at most "
                         r"\d+ in 1\.0s", since(n)), since(n)[-2000:]

    # resume through the CLI, as an operator would (same process tag: cleaned up with the federation)
    env = {**os.environ, **bundle.QUIET_ENV, TAG: fed.tag}
    proc = subprocess.run([sys.executable, "-m", "mira", "flower", "run", "--resume", str(out), "--superlink",
                           fed.address.address, "--insecure", "--timeout", "600"], env=env, capture_output=True,
                          text=True, timeout=700)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])

    flw, eng = load_adapters(out), load_adapters(reference[2])
    for c in range(N_CLIENTS):
        assert max_diff(flw[c], eng[c]) <= ATOL, f"client {c}"
    s, r = read_json(out / "summary.json"), read_json(reference[2] / "summary.json")
    assert s["rounds"] == 2 and [e["round"] for e in read_json(out / "rounds.json")] == [1, 2]
    assert s["mean_local_test_loss"] == pytest.approx(r["mean_local_test_loss"], abs=1e-6)
    for n in nodes:  # after the crash the nodes trained round 2 only: the run continued from its checkpoint
        assert "] fit round 2 in" in since(n) and "] fit round 1 in" not in since(n), since(n)[-2000:]
    print(f"nodes re-registered {reconnect_s:.1f}s after the SuperLink crash")


def _tagged(fed) -> list[int]:
    from mira.federated.flower.launch import tagged_pids

    return tagged_pids(fed.tag)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []
