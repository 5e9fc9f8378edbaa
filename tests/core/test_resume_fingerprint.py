"""Issue 15: ``mira run --resume`` continues only the run it was. The checkpoint holds a fingerprint of
what shapes the result (config fields, data and model files' hashes, the clients' records); a resume
with a config or data that differ is refused in one line naming the field, unless the change is
``federation.rounds`` (more rounds: the same run, continued) or named in ``--allow-changed``.

Which config a resume uses: the run's own ``config.yaml`` (and ``--set``), never a CONFIG argument."""
import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from mira.cli import main
from mira.federated.engine import CHECKPOINT
from tests.conftest import write_yaml


def _cfg(tiny_cfg, tmp_path, file="cfg.yaml", **changes):
    raw = copy.deepcopy(tiny_cfg)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return str(write_yaml(tmp_path / file, raw))


def _run(cfg, out, *extra):
    assert main(["run", cfg, "--out", str(out), "-q", *extra]) == 0


def _one_line_error(capsys, argv, code=2) -> str:
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err.strip()
    assert got == code, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _edit(run: Path, section: str, field: str | None, value) -> None:
    raw = yaml.safe_load((run / "config.yaml").read_text())
    if field is None:
        raw[section] = value
    else:
        raw[section][field] = value
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _adapters(run: Path) -> dict:
    return {p.parent.name: p.read_bytes() for p in sorted((run / "adapters").glob("*/adapter_model.safetensors"))}


@pytest.fixture
def done(tiny_cfg, tmp_path):
    """A finished 2-round fedit run."""
    out = tmp_path / "run"
    _run(_cfg(tiny_cfg, tmp_path, algorithm={"name": "fedit"}), out)
    return out


def test_the_fingerprint_is_in_the_checkpoint_and_beside_it(done):
    state = torch.load(done / CHECKPOINT, weights_only=True)
    fp = state["fingerprint"]
    assert fp == json.loads((done / "fingerprint.json").read_text())["fingerprint"]
    assert fp["lora.r"] == 4 and fp["algorithm.name"] == "fedit" and fp["algorithm.aggregation"] == "fedavg"
    assert fp["federation.lr"] == 0.01 and fp["federation.rounds"] == 2 and fp["data.max_per_task"] == 24
    assert fp["seed"] == 0 and fp["model.dtype"] == "float32" and fp["data.clients"] == 4
    assert fp["data.records"].startswith("sha256:") and fp["adapter.shapes"].startswith("sha256:")
    assert fp["model.files[config.json]"].startswith("sha256:")  # the local model folder's files
    assert not any(k.startswith(("plots", "model.device")) for k in fp)  # they change no number


def test_an_unchanged_run_resumes_and_stays_the_same(done, capsys):
    before = (done / "metrics.jsonl").read_bytes(), _adapters(done)
    assert main(["run", "--resume", str(done), "-q"]) == 0, capsys.readouterr().err
    assert ((done / "metrics.jsonl").read_bytes(), _adapters(done)) == before


@pytest.mark.parametrize("section,field,value,expect", [
    ("lora", "r", 8, "was made with lora.r=4, the config now says 8"),
    ("algorithm", None, {"name": "mira"}, "was made with algorithm.name=fedit, the config now says mira"),
    ("data", "max_per_task", 20, "was made with data.max_per_task=24, the config now says 20"),
    ("data", "tasks", ["add", "sub", "upper", "reverse_words"], "was made with data.tasks="),
    ("federation", "lr", 0.02, "was made with federation.lr=0.01, the config now says 0.02"),
    ("seed", None, 1, "was made with seed=0, the config now says 1"),
])
def test_an_edited_config_is_refused_in_one_line(done, capsys, section, field, value, expect):
    """Before: a traceback (rank, algorithm), or a resume on other data without a word (data)."""
    ck = (done / CHECKPOINT).read_bytes()
    _edit(done, section, field, value)
    err = _one_line_error(capsys, ["run", "--resume", str(done), "-q"])
    assert err.startswith(f"error: --resume: {done} ") and expect in err
    assert "edit it back, or start a new run" in err
    assert ("--allow-changed" in err) == (section != "algorithm")  # another algorithm's state cannot fit
    assert (done / CHECKPOINT).read_bytes() == ck


def test_a_set_on_resume_is_checked_too(done, capsys):
    err = _one_line_error(capsys, ["run", "--resume", str(done), "-q", "--set", "lora.alpha=32"])
    assert "lora.alpha=8.0, the config now says 32.0" in err


def _jsonl_run(tiny_cfg, tmp_path):
    from mira.data.synthetic import generate_suite

    records = [r for r in generate_suite(24, seed=5) if r.task in ("add", "upper")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    cfg = _cfg(tiny_cfg, tmp_path, "json.yaml", algorithm={"name": "fedit"},
               data={"source": "json", "path": str(data), "max_length": 80}, federation__rounds=1)
    out = tmp_path / "json_run"
    _run(cfg, out)
    return data, out


def test_a_changed_data_file_is_refused(tiny_cfg, tmp_path, capsys):
    data, out = _jsonl_run(tiny_cfg, tmp_path)
    fp = torch.load(out / CHECKPOINT, weights_only=True)["fingerprint"]
    assert fp["data.files[data.jsonl]"].startswith("sha256:")
    lines = data.read_text().splitlines()
    first = json.loads(lines[0])
    first["output"] += "9"
    data.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    err = _one_line_error(capsys, ["run", "--resume", str(out), "-q"])
    assert f"{out} was made with data.files[data.jsonl]=sha256:" in err and "the file now has sha256:" in err
    assert "(and 1 more: data.records)" in err
    # the user says the change is safe: a whole section can be named
    assert main(["run", "--resume", str(out), "-q", "--allow-changed", "data"]) == 0
    changes = json.loads((out / "fingerprint.json").read_text())["changes"]
    assert [c["field"] for c in changes] == ["data.files[data.jsonl]", "data.records"]
    assert main(["run", "--resume", str(out), "-q"]) == 0  # the checkpoint now holds the new fingerprint


def test_more_rounds_continue_the_same_run_exactly(tiny_cfg, tmp_path, capsys):
    """``federation.rounds`` may grow on resume: 2 rounds, then 3 (a --set), then 4 (the run's own
    config.yaml edited: the config a resume uses) equal an uninterrupted 4-round run."""
    cfg = _cfg(tiny_cfg, tmp_path)  # mira: its graphs are state too
    _run(cfg, tmp_path / "four", "--set", "federation.rounds=4")
    out = tmp_path / "run"
    _run(cfg, out)
    assert main(["run", "--resume", str(out), "-q", "--set", "federation.rounds=3"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["federation"]["rounds"] == 3
    _edit(out, "federation", "rounds", 4)
    assert main(["run", "--resume", str(out), "-q"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 4
    assert _adapters(out) == _adapters(tmp_path / "four")
    assert (out / "graph.npy").read_bytes() == (tmp_path / "four" / "graph.npy").read_bytes()
    changes = json.loads((out / "fingerprint.json").read_text())["changes"]
    assert [(c["round"], c["field"], c["was"], c["now"]) for c in changes] == [
        (2, "federation.rounds", 2, 3), (3, "federation.rounds", 3, 4)]
    # fewer rounds than are done: refused
    err = _one_line_error(capsys, ["run", "--resume", str(out), "-q", "--set", "federation.rounds=3"])
    assert f"{out} has run 4 rounds; federation.rounds=3 would undo some (set it to 4 or more)" in err


@pytest.mark.parametrize("name", ["oneshot", "fedit_ft"])
def test_rounds_are_fixed_where_the_schedule_depends_on_them(tiny_cfg, tmp_path, capsys, name):
    out = tmp_path / "run"
    _run(_cfg(tiny_cfg, tmp_path, algorithm={"name": name}), out)
    err = _one_line_error(capsys, ["run", "--resume", str(out), "-q", "--set", "federation.rounds=3"])
    assert "was made with federation.rounds=2, the config now says 3" in err


def test_allow_changed_accepts_a_named_change_and_records_it(done, capsys, caplog):
    _edit(done, "eval", "batch_size", 8)
    err = _one_line_error(capsys, ["run", "--resume", str(done), "-q"])
    assert "eval.batch_size=16, the config now says 8" in err and "--allow-changed eval.batch_size accepts it" in err
    with caplog.at_level("WARNING", logger="mira"):
        assert main(["run", "--resume", str(done), "-q", "--allow-changed", "eval.batch_size"]) == 0
    assert "eval.batch_size was 16, now 8: accepted (--allow-changed)" in caplog.text
    assert torch.load(done / CHECKPOINT, weights_only=True)["fingerprint"]["eval.batch_size"] == 8
    assert json.loads((done / "fingerprint.json").read_text())["changes"] == [
        {"round": 2, "field": "eval.batch_size", "was": 16, "now": 8}]
    assert main(["run", "--resume", str(done), "-q"]) == 0  # the run is now the changed one


@pytest.mark.parametrize("argv,expect", [
    (["--allow-changed", "algorithm.name"], "--allow-changed: algorithm.name cannot change on resume"),
    (["--allow-changed", "adapter.shapes"], "--allow-changed: adapter.shapes cannot change on resume"),
    (["--allow-changed", "lora.rank"], "--allow-changed: 'lora.rank' is not a field of the run's fingerprint"),
])
def test_allow_changed_refuses_what_cannot_change_and_unknown_fields(done, capsys, argv, expect):
    assert expect in _one_line_error(capsys, ["run", "--resume", str(done), "-q", *argv])


def test_a_changed_rank_is_refused_even_when_allowed(done, capsys):
    """The checkpoint's adapters have the old shapes: ``--allow-changed lora.r`` cannot make them fit."""
    _edit(done, "lora", "r", 8)
    err = _one_line_error(capsys, ["run", "--resume", str(done), "-q", "--allow-changed", "lora.r"])
    assert "the adapter's shapes differ (adapter.shapes=" in err and "--allow-changed" not in err.split("differ")[1]


def test_allow_changed_needs_resume(tiny_cfg, tmp_path, capsys):
    err = _one_line_error(capsys, ["run", _cfg(tiny_cfg, tmp_path), "--out", str(tmp_path / "o"), "-q",
                                   "--allow-changed", "eval"])
    assert "--allow-changed: --allow-changed only applies to --resume" in err
    assert not (tmp_path / "o").exists()


def test_resume_takes_no_config_argument(done, tiny_cfg, tmp_path, capsys):
    """Which config a resume uses is never ambiguous: the run's own config.yaml."""
    err = _one_line_error(capsys, ["run", _cfg(tiny_cfg, tmp_path, "other.yaml"), "--resume", str(done), "-q"])
    assert f"it continues the run with its own config ({done}/config.yaml) and takes no CONFIG" in err
    err = _one_line_error(capsys, ["run", "--resume", str(done), "--out", str(tmp_path / "x"), "-q"])
    assert "takes no --out" in err


def test_an_old_checkpoint_without_fingerprint_resumes_with_a_warning(tiny_cfg, tmp_path, caplog):
    cfg = _cfg(tiny_cfg, tmp_path, algorithm={"name": "fedit"})
    _run(cfg, tmp_path / "full")
    out = tmp_path / "old"
    _run(cfg, out, "--set", "federation.rounds=1")
    state = torch.load(out / CHECKPOINT, weights_only=True)
    for key in ("fingerprint", "fingerprint_changes"):
        del state[key]
    torch.save(state, out / CHECKPOINT)
    (out / "fingerprint.json").unlink()
    with caplog.at_level("WARNING", logger="mira"):
        assert main(["run", "--resume", str(out), "-q", "--set", "federation.rounds=2"]) == 0
    assert "has no fingerprint (written by an older mira)" in caplog.text
    assert _adapters(out) == _adapters(tmp_path / "full")
    assert "fingerprint" in torch.load(out / CHECKPOINT, weights_only=True)  # from now on it has one


def test_a_run_killed_before_its_first_checkpoint_takes_the_current_config(tiny_cfg, tmp_path):
    """No checkpoint: nothing to continue, so the resume starts at round 0 with config.yaml as it is now."""
    out = tmp_path / "run"
    _run(_cfg(tiny_cfg, tmp_path, algorithm={"name": "fedit"}), out)
    for name in (CHECKPOINT, "summary.json"):
        (out / name).unlink()
    _edit(out, "lora", "r", 8)
    assert main(["run", "--resume", str(out), "-q"]) == 0
    assert torch.load(out / CHECKPOINT, weights_only=True)["fingerprint"]["lora.r"] == 8
    assert json.loads((out / "fingerprint.json").read_text())["fingerprint"]["lora.r"] == 8
