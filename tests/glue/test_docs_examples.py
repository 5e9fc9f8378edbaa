"""The runnable examples of docs/merge.md and docs/glue.md (examples/merge-demo.yaml, examples/glue-demo.yaml).

They read the adapters of `mira demo` (runs/demo/mira); here a tiny federated run on the same
8 synthetic tasks (so the same client ids) stands in for the demo, and both examples run as shipped.
"""
from __future__ import annotations

import json
from pathlib import Path

from mira.cli import main

REPO = Path(__file__).resolve().parents[2]
TASKS = ["add", "lower", "reverse_chars", "reverse_words", "sort_digits", "sort_letters", "sub", "upper"]


def test_docs_examples_run(tiny_cfg, tmp_path, monkeypatch):
    import copy

    from mira.config import validate
    from mira.federated.engine import Engine
    from mira.federated.engine import Workspace

    raw = copy.deepcopy(tiny_cfg)
    raw["data"].update(tasks=TASKS, max_per_task=16)
    raw["partition"]["test_size"] = 4
    cfg = validate(raw)
    monkeypatch.chdir(tmp_path)
    Engine(Workspace.load(cfg), cfg, tmp_path / "runs/demo/mira").run()
    assert [c["task"] for c in json.loads((tmp_path / "runs/demo/mira/summary.json").read_text())["clients"]] == TASKS

    assert main(["merge", str(REPO / "examples/merge-demo.yaml"), "--out", "runs/merge-demo", "-q"]) == 0
    assert (tmp_path / "runs/merge-demo/adapter_config.json").exists()
    assert main(["glue", str(REPO / "examples/glue-demo.yaml"), "--out", "runs/glue-demo", "-q"]) == 0
    res = json.loads((tmp_path / "runs/glue-demo/glue.json").read_text())
    assert len(res["zoo"]["members"]) == 8
    for doc in ("docs/merge.md", "docs/glue.md"):
        assert "examples/" in (REPO / doc).read_text()
