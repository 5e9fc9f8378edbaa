"""Bad input: one line naming what and where, exit code 2, earlier results intact."""
import json

import numpy as np
import pytest

from mira.cli import main
from tests.conftest import write_yaml


def _err(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


def _cfg(tiny_cfg, tmp_path, **sections):
    raw = json.loads(json.dumps(tiny_cfg))
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k].update(v)
        else:
            raw[k] = v
    return str(write_yaml(tmp_path / "cfg.yaml", raw))


@pytest.mark.parametrize("section,value,message", [
    ("federation", {"lr": -0.1}, "federation.lr: learning rate must be positive"),
    ("federation", {"fraction": 0}, "federation.fraction: must be in (0, 1]"),
    ("federation", {"fraction": 1.5}, "federation.fraction: must be in (0, 1]"),
    ("algorithm", {"name": "fedsgd"}, "algorithm.name: unknown algorithm 'fedsgd'"),
    ("partition", {"name": "by_size"}, "partition.name: unknown partitioner 'by_size'"),
    ("model", {"path": "/no/such/model"}, "model.path: model folder not found"),
    ("algorithm", {"name": "mira", "graph": "file", "graph_file": "/no/g.npy"}, "graph file not found"),
    ("algorithm", {"name": "mira", "eta": 5.0, "graph": "uniform"}, "overshoot"),
    ("federation", {"batch_size": 0}, "federation.batch_size"),
    ("federation", {"rounds": "many"}, "federation.rounds"),
    ("lora", {"rank": 4}, "lora.rank: unknown field"),
])
def test_bad_config_values(tiny_cfg, tmp_path, capsys, section, value, message):
    err = _err(capsys, ["run", _cfg(tiny_cfg, tmp_path, **{section: value}), "--out", str(tmp_path / "o"), "-q"])
    assert message in err


def test_invalid_graph_matrix(tiny_cfg, tmp_path, capsys):
    np.save(tmp_path / "g.npy", np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0.]]))
    cfg = _cfg(tiny_cfg, tmp_path, algorithm={"name": "mira", "graph": "file", "graph_file": str(tmp_path / "g.npy")})
    assert "not symmetric" in _err(capsys, ["run", cfg, "--out", str(tmp_path / "o"), "-q"])


def test_malformed_json_line_names_file_and_line(tiny_cfg, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n')
    cfg = _cfg(tiny_cfg, tmp_path, data={"source": "json", "path": str(data), "tasks": None})
    assert f"{data}:2: malformed JSON line" in _err(capsys, ["run", cfg, "-q"])


def test_missing_field(tiny_cfg, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a"}\n')
    cfg = _cfg(tiny_cfg, tmp_path, data={"source": "json", "path": str(data), "tasks": None})
    assert f"{data}:1: missing field 'output'" in _err(capsys, ["run", cfg, "-q"])


def test_client_with_too_few_examples(tiny_cfg, tmp_path, capsys):
    cfg = _cfg(tiny_cfg, tmp_path, data={"max_per_task": 1})
    assert "client 0" in _err(capsys, ["run", cfg, "-q"])


def test_env_variable_not_set(tiny_cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MIRA_NOPE", raising=False)
    cfg = _cfg(tiny_cfg, tmp_path, model={"path": "${MIRA_NOPE}/models/x"})
    assert "model.path: environment variable MIRA_NOPE is not set" in _err(capsys, ["run", cfg, "-q"])


def test_bad_yaml_and_missing_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  rounds: [1, 2\n")
    assert f"{bad}:" in _err(capsys, ["run", str(bad)])
    assert "config file not found" in _err(capsys, ["run", str(tmp_path / "none.yaml")])
    assert "--set expects key=value" in _err(capsys, ["run", "--set", "federation.rounds"])


def test_bad_input_leaves_earlier_results_intact(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", _cfg(tiny_cfg, tmp_path), "--out", str(out), "-q"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _err(capsys, ["run", _cfg(tiny_cfg, tmp_path, federation={"lr": -1}), "--out", str(out), "-q"])
    _err(capsys, ["run", "--resume", str(tmp_path / "nothing")])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_run_with_overrides_and_compare(tiny_cfg, tmp_path, capsys):
    cfg = _cfg(tiny_cfg, tmp_path)
    assert main(["run", cfg, "--set", "algorithm.name=fedit", "--set", "federation.rounds=1",
                 "--out", str(tmp_path / "r"), "-q"]) == 0
    s = json.loads((tmp_path / "r/summary.json").read_text())
    assert s["algorithm"] == "fedit" and s["rounds"] == 1
    assert main(["compare", cfg, "--algorithms", "local,mira:graph=uniform,lambda=0.1", "--set", "federation.rounds=1",
                 "--out", str(tmp_path / "c"), "-q"]) == 0
    table = json.loads((tmp_path / "c/comparison.json").read_text())["algorithms"]
    assert set(table) == {"local", "mira(graph=uniform,lambda=0.1)"}
    assert "unknown algorithm" in _err(capsys, ["compare", cfg, "--algorithms", "local,fedsgd"])
