"""``mira glue`` end to end on a tiny zoo trained in the test, and bad input -> exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mira.cli import main

TASKS = ("add", "upper")


def test_cli_end_to_end(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "glue"
    assert main(["glue", str(tiny_zoo / "zoo.yaml"), "--out", str(out), "-q"]) == 0
    res = json.loads((out / "glue.json").read_text())
    assert res["tasks"] == list(TASKS)
    # the exact copy joins its original; the other task's adapter is its own cluster
    assert [c["members"] for c in res["clusters"]] == [["ad_add", "add_copy"], ["ad_upper"]]
    names = [e["name"] for e in res["entries"]]
    assert names[:3] == ["ad_add", "ad_upper", "add_copy"]
    assert {"cluster_0", "cluster_1", "router", "lora_mixture"} <= set(names)
    by = {e["name"]: e for e in res["entries"]}
    # each specialist is better on its own task, and the router (init from own prompts) gets the best of both
    assert by["ad_add"]["val"]["add"] < by["ad_upper"]["val"]["add"]
    assert by["ad_upper"]["val"]["upper"] < by["ad_add"]["val"]["upper"]
    assert by["router"]["init_accuracy"] == 1.0
    assert by["router"]["val_mean_loss"] < by[res["best_single"]]["val_mean_loss"]
    assert res["final"] == "router" and res["final_beats_best_single_val"]
    assert res["clusters"][0]["weights"] == [0.5, 0.5]  # the copy changes nothing, so average keeps it
    for f in ("glue.json", "glue.md", "glue.png", "router.pt", "clusters/cluster_0/adapter_config.json",
              "clusters/cluster_1/adapter_model.safetensors"):
        assert (out / f).exists(), f
    assert "| router" in (out / "glue.md").read_text()
    assert not list(tmp_path.glob(".glue.*"))  # no temporary folder left behind
    # existing output is protected unless --overwrite
    assert main(["glue", str(tiny_zoo / "zoo.yaml"), "--out", str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_scores_match_eval_loss(tiny_zoo, tiny_model_dir):
    """The per-sequence bookkeeping gives the same per-task loss as ``mira.eval.metrics.eval_loss``."""
    from mira.eval.metrics import eval_loss
    from mira.glue.pipeline import load_eval_set
    from mira.glue.scoring import Evaluator
    from mira.glue.zoo import load_members, load_zoo

    spec, root = load_zoo(tiny_zoo / "zoo.yaml")
    members, base = load_members(spec, root)
    ev = Evaluator(members, base)
    val = load_eval_set(spec.validation, root, ev.tokenizer, "validation")
    losses = ev.task_losses(members[0].state, val)
    for task in TASKS:
        sub = val.subset([i for i, r in enumerate(val.records) if r.task == task])
        assert abs(eval_loss(ev.model, sub, ev.pad_id)[0] - losses[task]) < 1e-4


def _write(root: Path, zoo: dict) -> Path:
    p = root / "bad.yaml"
    p.write_text(yaml.safe_dump(zoo))
    return p


@pytest.mark.parametrize("mutate, message", [
    (lambda z: z["members"].append({"path": "missing_adapter"}), "not found: missing_adapter"),
    (lambda z: z["strategy"].update(name="nope"), "unknown strategy"),
    (lambda z: z.pop("validation"), "validation"),
    (lambda z: z["validation"].update(path=None), "exactly one of path"),
    (lambda z: z.update(members=[]), "members"),
    (lambda z: z["validation"].update(tasks=["no_such_task"]), "no_such_task"),
    (lambda z: z.update(colour="blue"), "colour"),
])
def test_bad_zoo_exit_2(tiny_zoo, tmp_path, capsys, mutate, message):
    zoo = yaml.safe_load((tiny_zoo / "zoo.yaml").read_text())
    mutate(zoo)
    path = _write(tiny_zoo, zoo)
    assert main(["glue", str(path), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "o").exists()


def test_missing_zoo_file_exit_2(tmp_path, capsys):
    assert main(["glue", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "zoo file not found" in capsys.readouterr().err
