"""The Flower runtime's pieces without starting processes: records, node config, the
generated Flower App, certificates, the warm worker's socket protocol."""
from __future__ import annotations

import pytest

from mira.errors import MiraError

from .conftest import flower_cfg


def test_records_round_trip():
    from mira.federated.flower import protocol as p

    task = p.FitTask(b"MIRA" + bytes(60), rnd=3, seed=7, prox_mu=0.01, frozen=["a"], keys=["b", "c"], lossless=True,
                      step_scale=4)
    assert p.parse_fit(p.fit_content(task)) == task
    assert p.parse_fit(p.fit_content(p.FitTask(b"x", 1, 2))) == p.FitTask(b"x", 1, 2)  # empty lists
    buf, m = p.parse_fit_reply(p.fit_reply(b"abc", {"n_train": 3, "train_loss": 0.5}))
    assert buf == b"abc" and m == {"n_train": 3, "train_loss": 0.5}
    assert p.parse_eval(p.eval_content([b"a", b"bb"], own=1, rnd=2)) == ([b"a", b"bb"], 1, 2)
    assert p.parse_eval_reply(p.eval_reply([1.0, 2.0], 10, {"rouge_l": 0.5})) == {"losses": [1.0, 2.0], "tokens": 10,
                                                                                   "rouge_l": 0.5}
    info = {"partition_id": 1, "num_partitions": 3, "task": "add", "n_train": 12, "n_test": 4}
    assert p.parse_hello(9, p.hello_reply(info)) == p.NodeInfo(9, 1, 3, "add", 12, 4)


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
