"""Fixtures for the Flower tests: a tiny run config, the in-process reference runs, and
local federations (real SuperLink/SuperNode processes on 127.0.0.1) that are always
stopped, with a check that none of their processes survive."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("MIRA_THREADS", "1")

# 3 clients (one task each) on mira's builtin demo model, 2 rounds of 2 local steps.
FLOWER_CFG = {
    "seed": 0,
    "model": {"path": "builtin:demo"},
    "lora": {"r": 4, "alpha": 8},
    "data": {"source": "synthetic", "tasks": ["add", "upper", "reverse_words"], "max_per_task": 16,
             "max_length": 80},
    "partition": {"name": "by_task", "test_size": 4},
    "federation": {"rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 0.01},
    "algorithm": {"name": "mira", "lambda": 0.5},
    "eval": {"every": 2},
    "plots": False,
}
N_CLIENTS = 3
ATOL = 1e-6  # adapters: the same code on the same inputs; observed difference is exactly 0


def flower_cfg(**sections) -> dict:
    raw = copy.deepcopy(FLOWER_CFG)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def load_adapters(run_dir: Path) -> dict[int, dict]:
    from safetensors.torch import load_file

    return {c: load_file(run_dir / "adapters" / f"client_{c}" / "adapter_model.safetensors") for c in range(N_CLIENTS)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[int, Path]:
    """The in-process engine on FLOWER_CFG, stopped after 1 and after 2 rounds (also builds
    the demo model into the cache before any SuperNode needs it)."""
    from mira.config import validate
    from mira.federated.engine import Engine, Workspace

    root = tmp_path_factory.mktemp("reference")
    out = {}
    ws = None
    for rounds in (1, 2):
        cfg = validate(flower_cfg(federation={"rounds": rounds}))
        ws = ws or Workspace.load(cfg)
        Engine(ws, cfg, root / f"r{rounds}", quiet=True).run()
        out[rounds] = root / f"r{rounds}"
    return out


@pytest.fixture
def federations(tmp_path):
    """Factory of ``LocalFederation``s; every one is closed at teardown, even when the test
    failed, and the test errors if any of its processes is still alive afterwards."""
    from mira.federated.flower.launch import LocalFederation

    made: list[LocalFederation] = []

    def make(**kw) -> LocalFederation:
        fed = LocalFederation(tmp_path / f"fed{len(made)}", **kw)
        made.append(fed)
        return fed

    yield make
    leftovers = []
    for fed in made:
        leftovers += fed.close(grace=2.0)
    assert not leftovers, f"processes survived the test: {leftovers}"


def run_and_wait(fed, raw: dict, out: Path, timeout: float = 600, **settings) -> dict:
    """Submit ``raw`` to ``fed``, wait for it, and fail with the run's log if it did not complete."""
    from mira.federated.flower import bundle
    from mira.federated.flower.settings import RunSettings

    from mira.errors import MiraError

    run_id = fed.submit(bundle.config_text(raw), RunSettings(out_dir=str(out), **settings))
    try:
        info = fed.wait(run_id, timeout=timeout)
    except MiraError as e:  # a run that hangs: say where (the ServerApp's log and every process's tail)
        tails = {name: proc.text()[-1500:] for name, proc in fed.procs.items()}
        pytest.fail(f"{e}\nserverapp log:\n{fed.logs(run_id)[-4000:]}\nprocess logs: {tails}")
    assert info["status"] == "finished:completed", (info, fed.logs(run_id)[-4000:])
    return info
