"""The Flower runtime's pieces without starting processes: records, node config, the
generated Flower App, certificates, the warm worker's socket protocol."""
from __future__ import annotations

import pytest

from mira.errors import MiraError

from .conftest import flower_cfg


def test_records_round_trip():
    import numpy as np

    from mira.federated.flower import protocol as p

    t = p.Tensors("float32", {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "c": np.ones(4, np.float32)})
    task = p.FitTask(t, rnd=3, seed=7, prox_mu=0.01, frozen=["a"], keys=["b", "c"], lossless=True, step_scale=4)
    assert p.parse_fit(p.fit_content(task)) == task
    empty = p.Tensors("float16", {})
    assert p.parse_fit(p.fit_content(p.FitTask(t, 1, 2))) == p.FitTask(t, 1, 2)  # empty lists
    tensors, m = p.parse_fit_reply(p.fit_reply(t, {"n_train": 3, "train_loss": 0.5}))
    assert tensors == t and m == {"n_train": 3, "train_loss": 0.5}
    assert t.nbytes == 16 + 10 * 4 and empty.nbytes == 16
    assert p.parse_eval(p.eval_content([t, t], own=1, rnd=2)) == ([t, t], 1, 2)
    assert p.parse_eval_reply(p.eval_reply([1.0, 2.0], 10, {"rouge_l": 0.5})) == {"losses": [1.0, 2.0], "tokens": 10,
                                                                                   "rouge_l": 0.5}
    info = {"partition_id": 1, "num_partitions": 3, "task": "add", "n_train": 12, "n_test": 4}
    assert p.parse_hello(9, p.hello_reply(info)) == p.NodeInfo(9, 1, 3, "add", 12, 4)


def _message(content):
    from flwr.app import Message

    return Message(content, dst_node_id=1, message_type="train.x")


def _flower_trip(content):
    """``content`` deflated to Flower's objects and inflated again, as between two processes."""
    from .test_secagg import _transfer

    return _transfer(_message(content), "m1").content


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_named_tensors_carry_the_wire_codecs_numbers(dtype, monkeypatch):
    """TensorCodec -> ArrayRecord -> Flower's (de)serialisation -> TensorCodec gives bitwise what
    WireCodec's encode/decode gives (the in-process engine's transfer), with the same byte count;
    each tensor is one named Array that Flower's public API reads."""
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from mira.federated.flower import protocol as p
    from mira.federated.wire import WireCodec

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1 if attr == "_run_id" else 0)
    g = torch.Generator().manual_seed(0)
    state = {"x.lora_A.weight": torch.randn(4, 16, generator=g), "x.lora_B.weight": torch.randn(16, 4, generator=g),
             "y.lora_A.weight": torch.randn(4, 8, generator=g) * 1e-3}
    keys = list(state)
    wire, tc = WireCodec(state, dtype), p.TensorCodec(state, dtype)
    buf = wire.encode(state, keys)
    ref = wire.decode(buf, keys)
    t = tc.encode(state, keys)
    assert t.nbytes == len(buf) and tc.raw_bytes(keys) == wire.raw_bytes(keys)
    content = _flower_trip(p.fit_content(p.FitTask(t, 1, 0)))
    rec = content["adapter"]
    assert list(rec) == keys
    for k in keys:
        arr = rec[k]
        assert tuple(arr.shape) == tuple(state[k].shape) and arr.dtype == dtype
        if dtype == "bfloat16":
            assert arr.stype == p.BF16_STYPE and len(arr.data) == 2 * state[k].numel()
            with pytest.raises(TypeError):  # numpy has no bfloat16: Flower's numpy() refuses, loudly
                arr.numpy()
        else:
            assert arr.stype == "numpy.ndarray" and str(arr.numpy().dtype) == dtype
    back = tc.decode(p.parse_fit(content).adapter, keys)
    for k in keys:
        assert back[k].dtype == torch.float32 and torch.equal(back[k], ref[k]), k
    assert content["fit"]["wire_dtype"] == dtype
    # payload_bytes (public count_bytes()): the tensor bytes, numpy headers and keys, and the config
    assert t.nbytes - 16 < p.payload_bytes(_message(content)) < t.nbytes + 200 * len(keys) + 200


def test_tensors_that_do_not_fit_the_model_are_refused_by_name():
    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord

    from mira.federated.flower import protocol as p

    state = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    keys = list(state)
    tc = p.TensorCodec(state, "float16")
    good = tc.encode(state, keys)
    missing = p.Tensors("float16", {"a.lora_A.weight": good.arrays["a.lora_A.weight"]})
    with pytest.raises(p.PayloadError, match=r"1 sent, 2 expected; 1 expected here are missing \(e.g. a.lora_B"):
        tc.decode(missing, keys)
    extra = p.Tensors("float16", {**good.arrays, "b.lora_A.weight": np.zeros((2, 2), np.float16)})
    with pytest.raises(p.PayloadError, match="1 are not in this model's LoRA .e.g. b.lora_A.weight"):
        tc.decode(extra, keys)
    wrong = p.Tensors("float16", {**good.arrays, "a.lora_A.weight": np.zeros((4, 3), np.float16)})
    with pytest.raises(p.PayloadError, match=r"a.lora_A.weight: shape \(4, 3\) on the wire, \(2, 3\)"):
        tc.decode(wrong, keys)
    with pytest.raises(p.PayloadError, match="float32/float16"):  # integers are not an adapter
        p.from_record(ArrayRecord({"a": Array(np.zeros(3, np.int64))}))
    with pytest.raises(p.PayloadError, match="unsupported Array stype"):
        p.from_record(ArrayRecord({"a": Array(dtype="uint8", shape=(3,), stype="mira.wire", data=b"abc")}))
    with pytest.raises(p.PayloadError, match="2 bytes a value"):
        p.from_record(ArrayRecord({"a": Array(dtype="bfloat16", shape=(3,), stype=p.BF16_STYPE, data=b"abcd")}))
    with pytest.raises(p.PayloadError, match="mix dtypes"):
        p.from_record(ArrayRecord({"a": Array(np.zeros(3, np.float16)), "b": Array(np.zeros(3, np.float32))}))


def test_node_config_is_checked():
    from mira.federated.flower.node import NodeSpec, node_spec

    assert node_spec({"partition-id": 2, "num-partitions": 3}) == NodeSpec(2, 3)
    assert node_spec({"partition-id": 0, "num-partitions": 1, "data-path": "/d.jsonl"}).data_path == "/d.jsonl"
    for bad, msg in [({"num-partitions": 3}, "missing partition-id"),
                     ({"partition-id": 3, "num-partitions": 3}, "must be in"),
                     ({"partition-id": "x", "num-partitions": 3}, "integers"),
                     ({"partition-id": 0, "num-partitions": 3, "partition": 1}, "unknown node-config")]:
        with pytest.raises(MiraError, match=msg):
            node_spec(bad)


def test_node_partition_is_the_engines(tmp_path):
    """Without data-path a node holds exactly the engine's client; with it, its own file."""
    import json

    from mira.config import validate
    from mira.data.partition import partition
    from mira.data.records import load_records
    from mira.federated.flower.node import NodeSpec, hello_info, load_client_data

    cfg = validate(flower_cfg())
    clients = partition(load_records(cfg.data, seed=cfg.data.seed), cfg.partition, seed=cfg.seed)
    for c in clients:
        mine = load_client_data(cfg, NodeSpec(c.id, len(clients)))
        assert (mine.task, mine.train, mine.test) == (c.task, c.train, c.test)
    with pytest.raises(MiraError, match="num-partitions=4"):
        load_client_data(cfg, NodeSpec(0, 4))

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
    cfg = validate(flower_cfg(data={"source": "json", "tasks": None}))
    info = hello_info(cfg, NodeSpec(1, 3, str(path)))
    assert info == {"partition_id": 1, "num_partitions": 3, "task": "mine", "n_train": 6, "n_test": 4}


def test_generated_app_is_a_valid_flower_app(tmp_path):
    """`flwr run` accepts the generated pyproject.toml; its run config carries the YAML."""
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import get_fused_config_from_dir

    from mira.federated.flower import bundle
    from mira.federated.flower.node import run_config_of
    from mira.federated.flower.settings import RunSettings

    settings = RunSettings(out_dir="/srv/runs/x", round_timeout=60.0, straggler_timeout=5.0)
    app = bundle.write_app(tmp_path / "app", bundle.config_text(flower_cfg()), settings)
    config, _ = load_and_validate(app / "pyproject.toml", check_module=True)
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "mira.federated.flower.client_app:app"
    run_config = get_fused_config_from_dir(app, {})
    assert RunSettings.from_run_config(run_config) == settings
    assert run_config_of(run_config).data.tasks == ["add", "upper", "reverse_words"]


def test_cli_home_and_tls_arguments(tmp_path):
    import tomli

    from mira.federated.flower import bundle

    home = bundle.write_cli_home(tmp_path / "h", bundle.SuperLinkAddress("10.0.0.5:9093", insecure=True))
    conn = tomli.loads((home / "config.toml").read_text())["superlink"]
    assert conn["default"] == "mira" and conn["mira"] == {"address": "10.0.0.5:9093", "insecure": True}
    with pytest.raises(MiraError, match="--root-cert"):
        bundle.SuperLinkAddress("h:1").check()
    with pytest.raises(MiraError, match="not both"):
        bundle.SuperLinkAddress("h:1", root_cert="ca.crt", insecure=True).check()


def test_certificates(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from mira.federated.flower.certs import generate_all

    files = generate_all(tmp_path, nodes=2)
    ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(files["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)][:1] == ["127.0.0.1"]
    priv, pub = files["nodes"][1]
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert key.public_key() == load_ssh_public_key(pub.read_bytes())
    assert key.curve.name == "secp384r1"
    assert (priv.stat().st_mode & 0o777) == 0o600
    with pytest.raises(MiraError, match="overwrite"):
        generate_all(tmp_path, nodes=1)


def test_worker_socket_protocol(tmp_path, monkeypatch):
    """The ClientApp <-> warm worker hop: authenticated, errors come back as MiraError."""
    from mira.federated.flower import worker

    seen = []

    class Echo(worker.Worker):
        def handle(self, req):
            seen.append(req)
            if req["kind"] == "boom":
                raise ValueError("bad request")
            return {"info": req["kind"]}

    address = str(tmp_path / "w.sock")
    Echo().serve(address)
    assert worker.call(address, {"kind": "hello"}) == {"info": "hello"}
    with pytest.raises(MiraError, match="ValueError: bad request"):
        worker.call(address, {"kind": "boom"})
    (tmp_path / "w.sock.key").write_bytes(b"wrong key")  # a client without the key is refused
    from multiprocessing import AuthenticationError

    with pytest.raises((AuthenticationError, MiraError)):
        worker.call(address, {"kind": "hello"})
    assert [r["kind"] for r in seen] == ["hello", "boom"]


def test_settings_from_run_config():
    from mira.federated.flower.settings import RunSettings

    s = RunSettings.from_run_config({"out-dir": "/x", "straggler-timeout": 3, "resume": "true"})
    assert (s.out_dir, s.straggler_timeout, s.resume) == ("/x", 3.0, True)
    with pytest.raises(MiraError):
        RunSettings.from_run_config({"round-timeout": -1})
    with pytest.raises(MiraError):
        RunSettings.from_run_config({"node-wait": "soon"})


def test_supervisor_restarts_with_bounded_backoff_and_stops_on_permanent_errors(capfd):
    """``worker.supervise``: a SuperNode that exits is started again after 1, 2, 4, ... s (at most
    ``BACKOFF_MAX``), logged; it gives up after ``max_restarts`` quick exits in a row; an exit code
    no restart can fix (305: refused by the SuperLink) ends it at once."""
    import time

    from mira.federated.flower import worker

    assert [worker.backoff(n) for n in (1, 2, 3, 4, 5, 6, 7, 20)] == [1, 2, 4, 8, 16, 30, 30, 30]
    t0 = time.monotonic()
    assert worker.supervise(["sh", "-c", "echo started; exit 0"], max_restarts=2, base=0.05, cap=0.08) == 1
    assert time.monotonic() - t0 < 5
    err = capfd.readouterr()
    assert err.out.count("started") == 3  # the first start and 2 restarts
    assert "restart 1 of at most 2 in 0.1s" in err.err and "restart 2 of at most 2 in 0.1s" in err.err
    assert "giving up after 2 restarts" in err.err
    assert worker.supervise(["sh", "-c", "echo started; exit 305"], max_restarts=5, base=0.01) == 305 % 256
    err = capfd.readouterr()
    assert err.out.count("started") == 1 and "exit code 305: the SuperLink refused" in err.err
    # Flower's SuperNode exits 1 for every error; mira's entry point writes the Flower code for the supervisor
    assert worker.supervise(["sh", "-c", 'echo started; echo 305 > "$MIRA_SUPERNODE_STATUS"; exit 1'],
                            max_restarts=5, base=0.01) == 1
    err = capfd.readouterr()
    assert err.out.count("started") == 1 and "exit code 305: the SuperLink refused" in err.err
    assert "not restarting it" in err.err
    assert worker.supervise(["sh", "-c", "exit 3"], max_restarts=0) == 3  # --max-restarts 0: never restart


def test_supervisor_stops_a_node_whose_late_superlink_speaks_the_other_transport(capfd, tmp_path):
    """``supervise(watch=...)``: the watch is asked every ``watch_interval`` s while it waits; once
    it reports a mismatch the running SuperNode is stopped, the one line printed, and 2 returned
    (no restart). A watch that says ``ok`` is not asked again; one that raises stops watching."""
    import threading
    import time

    from mira.federated.flower import worker

    marker = tmp_path / "started"
    calls = []

    def watch():  # "waiting" until the child runs, then twice more, then the mismatch
        calls.append(time.monotonic())
        if not marker.exists() or len(calls) < 3:
            return "waiting"
        return "error: --insecure: the SuperLink at h:1 speaks TLS; ..."

    t0 = time.monotonic()
    assert worker.supervise(["sh", "-c", f"echo started; touch {marker}; exec sleep 60"], watch=watch,
                            watch_interval=0.05) == 2
    assert time.monotonic() - t0 < 20 and len(calls) >= 3
    err = capfd.readouterr()
    assert err.out.count("started") == 1 and "restart" not in err.err
    assert [ln for ln in err.err.splitlines() if ln.startswith("error:")] == [
        "error: --insecure: the SuperLink at h:1 speaks TLS; ..."]

    asked = threading.Event()
    oks = []

    def ok():
        oks.append(1)
        asked.set()
        return "ok"

    marker2 = tmp_path / "asked"
    threading.Thread(target=lambda: asked.wait(20) and marker2.touch(), daemon=True).start()
    # the child lives until the watch has been asked once (marker2), then exits 3
    assert worker.supervise(["sh", "-c", f"while [ ! -e {marker2} ]; do sleep 0.05; done; sleep 0.3; exit 3"],
                            max_restarts=0, watch=ok, watch_interval=0.05) == 3
    assert oks == [1]  # asked once, then never again

    def broken():
        raise OSError("ca.crt is gone")

    assert worker.supervise(["sh", "-c", "sleep 0.5; exit 4"], max_restarts=0, watch=broken, watch_interval=0.05) == 4
    assert "transport check failed (OSError: ca.crt is gone)" in capfd.readouterr().err


def test_transport_watch_needs_two_mismatches_in_a_row(monkeypatch):
    """One reset or stalled handshake while a SuperLink starts reads as "plain": the watch reports
    a mismatch only when two probes in a row say so; an unreachable probe resets the count."""
    from mira.federated.flower import node

    answers = iter(["plain (ConnectionResetError)", "unreachable: refused", "plain (timeout)", "tls",
                    "plain (SSLError)", "plain (SSLError)"])
    monkeypatch.setattr(node, "probe_tls", lambda *a, **k: next(answers))
    w = node.TransportWatch("127.0.0.1:1", insecure=False, ca="ca.crt")
    assert [w() for _ in range(3)] == ["waiting", "waiting", "waiting"]
    assert w() == "ok"
    assert w() == "waiting" and w().startswith("error: --root-cert: the SuperLink at 127.0.0.1:1 does not speak TLS")


def test_supernode_cli_is_supervised_and_resume_takes_the_run_dir(tmp_path):
    """``mira flower supernode`` runs the SuperNode under the supervisor, with ``mira flower local``'s
    poll settings; ``mira flower run --resume RUN_DIR`` reads RUN_DIR's config."""
    from typer.testing import CliRunner

    from mira.federated.flower.cli import flower_app

    runner = CliRunner()
    node = ["supernode", "--partition-id", "0", "--num-partitions", "2", "--insecure", "--dry-run"]
    r = runner.invoke(flower_app, node)
    assert r.exit_code == 0, r.output
    assert "FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.3 " in r.output
    assert "mira.federated.flower.worker --cold --max-restarts 10 -- " in r.output and "flower-supernode" in r.output
    r = runner.invoke(flower_app, [*node, "--warm", "--max-restarts", "3"])
    assert r.exit_code == 0 and "worker --max-restarts 3 -- " in r.output, r.output
    r = runner.invoke(flower_app, ["run", "--resume", str(tmp_path / "nowhere"), "--insecure"])
    assert isinstance(r.exception, MiraError) and "config.yaml not found" in str(r.exception), r.output
    r = runner.invoke(flower_app, ["run", "--resume", str(tmp_path), "--out", str(tmp_path / "other"), "--insecure"])
    assert isinstance(r.exception, MiraError) and "names another" in str(r.exception), r.output


def test_warm_worker_stops_the_compute_when_its_clientapp_goes_away(tmp_path, monkeypatch):
    """flwr stop / a Flower timeout kills the ClientApp that waits on the worker: the worker's
    compute for that request must stop too, and the worker must go on serving."""
    import threading
    import time
    from multiprocessing.connection import Client

    from mira.federated.flower import worker as wmod

    steps = {"n": 0}

    def handle(self, req):
        if req["kind"] == "slow":
            while True:  # a training loop that would run for ever
                steps["n"] += 1
                time.sleep(0.01)
        return {"ok": req["kind"]}

    monkeypatch.setattr(wmod.Worker, "handle", handle)
    w = wmod.Worker()
    w.poll_s = 0.05
    address = str(tmp_path / "w.sock")
    w.serve(address)
    key = wmod._key_path(address).read_bytes()
    try:
        conn = Client(address, family="AF_UNIX", authkey=key)
        conn.send({"kind": "slow"})
        time.sleep(0.3)
        assert steps["n"] > 0
        conn.close()  # the ClientApp is killed while its request runs
        deadline = time.time() + 5
        while w.cancelled == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert w.cancelled == 1
        n = steps["n"]
        time.sleep(0.3)
        assert steps["n"] == n  # the compute has stopped
        assert wmod.call(address, {"kind": "next"}) == {"ok": "next"}  # and the worker still serves
        assert [t.name for t in threading.enumerate()].count("mira-node-worker-watch") == 0
    finally:
        w.close()


def test_a_worker_that_dies_mid_request_fails_the_clientapp_with_an_error(tmp_path):
    """A crashed warm worker must fail the task visibly: the ClientApp's call raises (Flower then
    reports the task as failed) instead of hanging or answering nothing."""
    import os
    import threading
    from multiprocessing.connection import Listener

    from mira.errors import MiraError
    from mira.federated.flower import worker as wmod

    address = str(tmp_path / "w.sock")
    key = os.urandom(32)
    wmod._key_path(address).write_bytes(key)
    listener = Listener(address, family="AF_UNIX", authkey=key)

    def dies():
        conn = listener.accept()
        conn.recv()
        conn.close()  # the worker process died while computing

    t = threading.Thread(target=dies, daemon=True)
    t.start()
    with pytest.raises(MiraError, match="warm worker .* is not reachable"):
        wmod.call(address, {"kind": "fit"})
    t.join(5)
    listener.close()


def test_run_stop_watch_finishes_a_stopped_runs_tasks_and_ends_the_wait():
    """The SuperNode's wait for a reply asks the SuperLink about the run (in a thread, at most
    every ``every`` s); a run that is no longer running has its unfinished tasks marked stopped in
    the node's state, its late replies and objects dropped, and the wait ends; a running run, or an
    unreachable SuperLink, leaves all of it alone."""
    import time
    import types

    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.run import RunNotRunningException

    from mira.federated.flower import supernode

    def reply(mid, run_id):
        return types.SimpleNamespace(metadata=types.SimpleNamespace(message_id=mid, run_id=run_id))

    class State:
        def __init__(self):
            self.finished, self.replies, self.deleted = [], [], []

        def get_tasks(self, run_ids, statuses):
            assert run_ids == [7] and set(statuses) == {Status.PENDING, Status.STARTING, Status.RUNNING}
            return [types.SimpleNamespace(task_id=70), types.SimpleNamespace(task_id=71)]

        def finish_task(self, task_id, sub_status, details):
            self.finished.append((task_id, sub_status))
            return True

        def get_messages_legacy(self, run_ids, is_reply):
            assert is_reply is True
            return [m for m in self.replies if m.metadata.run_id in run_ids and m.metadata.message_id not in self.deleted]

        def delete_messages(self, message_ids):
            self.deleted += message_ids

    class Store:
        def __init__(self):
            self.runs_freed, self.deleted = [], []

        def delete_objects_in_run(self, run_id):
            self.runs_freed.append(run_id)

        def delete(self, object_id):
            self.deleted.append(object_id)

    link = {"mode": "running", "calls": 0}

    def get_run(run_id):
        link["calls"] += 1
        if link["mode"] == "stopped":
            raise RunNotRunningException
        if link["mode"] == "down":
            raise OSError("connection refused")

    now = [0.0]
    sci = types.SimpleNamespace(time=time)
    waits = []

    def pull(**kw):
        return 7

    def push(**kw):  # Flower's wait for a reply: sleeps until one exists
        for _ in range(100):
            now[0] += 0.5
            sci.time.sleep(0)
            watch.asking is None or watch.asking.join(5)  # the question's answer is in before the next sleep
        waits.append("reply")

    sci._pull_and_store_message, sci._push_messages = pull, push
    watch = supernode.RunStopWatch(every=3.0, clock=lambda: now[0])
    assert watch.install(sci)
    state, store = State(), Store()
    assert sci._pull_and_store_message(state=state, get_run=get_run, object_store=store) == 7
    sci.time.sleep(0)  # not waiting for a reply: no question to the SuperLink
    assert link["calls"] == 0

    sci._push_messages()  # the run keeps running: the wait goes to its end, ~1 question per 3 s
    assert waits == ["reply"] and state.finished == [] and 15 <= link["calls"] <= 17
    link["mode"], link["calls"] = "down", 0
    sci._push_messages()
    assert waits == ["reply"] * 2 and state.finished == [] and link["calls"] > 0
    link["mode"] = "stopped"
    state.replies.append(reply("late-1", 7))  # stored by the ClientApp while the question was out
    sci._push_messages()  # ends early, without a reply
    assert waits == ["reply"] * 2 and watch.stopped == [7]
    assert state.finished == [(70, SubStatus.STOPPED), (71, SubStatus.STOPPED)]
    assert state.deleted == ["late-1"] and store.deleted == ["late-1"] and store.runs_freed == [7]
    # a reply of the stopped run that comes in even later is dropped before the next run's wait
    state.replies += [reply("late-2", 7), reply("next-run", 8)]
    watch.run_id, link["mode"] = 8, "running"
    sci._push_messages()
    assert "late-2" in state.deleted and "next-run" not in state.deleted and waits[-1] == "reply"


def test_the_forkserver_shortens_flowers_task_heartbeat(monkeypatch):
    import flwr.supercore.heartbeat as hb

    from mira.federated.flower import forkserver

    monkeypatch.setattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    assert forkserver._shorten_task_heartbeat() and hb.HEARTBEAT_DEFAULT_INTERVAL == forkserver.TASK_HEARTBEAT
    monkeypatch.setenv(forkserver.TASK_HEARTBEAT_ENV, "1")  # never below the call timeout + 1, never above Flower's
    monkeypatch.setattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    assert forkserver._shorten_task_heartbeat() and hb.HEARTBEAT_DEFAULT_INTERVAL == hb.HEARTBEAT_CALL_TIMEOUT + 1
    monkeypatch.setenv(forkserver.TASK_HEARTBEAT_ENV, "99")
    monkeypatch.setattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    assert forkserver._shorten_task_heartbeat() and hb.HEARTBEAT_DEFAULT_INTERVAL == 30


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """Even when the OS offers a port again (nothing was bound to it yet), free_port gives another one."""
    import socket as socket_mod

    from mira.federated.flower import launch

    real = socket_mod.socket
    offered = iter([50001, 50001, 50001, 50002])

    class Fake:
        def __init__(self, *a, **kw):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def bind(self, addr):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(launch, "_HANDED_OUT", set())
    monkeypatch.setattr(launch.socket, "socket", Fake)
    assert launch.free_port() == 50001
    assert launch.free_port() == 50002  # 50001 offered twice more, refused
    monkeypatch.setattr(launch.socket, "socket", real)
    ports = {launch.free_port() for _ in range(20)}
    assert len(ports) == 20 and not ports & {50001, 50002}
