"""Issue 15: SIGKILL a real ``mira run`` process at any moment, then ``--resume``: it ends bitwise equal
to the uninterrupted run.

* for every registered strategy (``STRATEGIES``, so new ones are covered): a kill right after the
  first checkpoint, and a kill in the middle of a checkpoint write (the temp file written, not
  renamed: ``MIRA_TEST_KILL_AT``, a hook in ``mira.io``), each followed by ``--resume``;
* 20 kills at random moments (uniform over an uninterrupted run's duration) of chained runs of one
  config: every process ends killed or finished, never unresumable (``--resume``, or the first
  command again when the kill came before ``config.yaml`` was written), and every run ends equal.

The processes are forked from a server that has imported torch and co. once (``kill_server.py``):
each one is a real process with its own memory, killed with SIGKILL, but starts in 0.1 s, not 3 s.
"""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mira.federated.engine import CHECKPOINT
from mira.federated.strategies import STRATEGIES
from tests.conftest import write_yaml

ROOT = Path(__file__).resolve().parents[2]
TIMES = ("round_time_s", "train_step_time_s", "eval_time_s", "wall_time_s")
RANDOM_KILLS = 20
# options a strategy needs to run on the tiny config (none so far); everything else runs with defaults
OPTIONS: dict[str, dict] = {}


class Server:
    """The fork server: ``start`` a ``mira`` command, ``wait`` for its end (or ``kill`` it first)."""

    def __init__(self, logs: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "core" / "kill_server.py")], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.logs, self.n = logs, 0

    def start(self, argv: list[str], kill_at: str | None = None) -> tuple[int, Path]:
        self.n += 1
        log = self.logs / f"{self.n:03d}.log"
        env = {"MIRA_TEST_KILL_AT": kill_at, "MIRA_CACHE": str(self.logs / "cache")}
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"], log

    def wait(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the kill server died"
        return json.loads(line)

    def run(self, argv: list[str], kill_at: str | None = None) -> dict:
        _, log = self.start(argv, kill_at)
        res = self.wait()
        res["log"] = log.read_text()
        return res

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, configs):
    s = Server(tmp_path_factory.mktemp("kill_logs"))
    warm = s.run(["run", configs["mira"], "--out", str(tmp_path_factory.mktemp("kill_warm") / "run"), "-q"])
    assert warm["code"] == 0, warm["log"]  # and the server has imported what a run imports
    yield s
    s.close()


def tiny(model_dir: Path) -> dict:
    """``conftest.tiny_cfg`` (a module-scoped fixture cannot use that function-scoped one)."""
    return {
        "seed": 0, "model": {"path": str(model_dir)}, "lora": {"r": 4, "alpha": 8},
        "data": {"source": "synthetic", "tasks": ["add", "sub", "upper", "lower"], "max_per_task": 24,
                 "max_length": 80},
        "partition": {"name": "by_task", "test_size": 6},
        "federation": {"rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 0.01},
        "algorithm": {"name": "mira"}, "eval": {"every": 1, "batch_size": 16}, "plots": False,
    }


@pytest.fixture(scope="module")
def configs(tiny_model_dir, tmp_path_factory):
    """One config file per strategy (the tiny config, 2 rounds)."""
    raw = tiny(tiny_model_dir)
    folder = tmp_path_factory.mktemp("kill_cfgs")
    out = {}
    for name in STRATEGIES:
        r = copy.deepcopy(raw)
        r["algorithm"] = {"name": name, **OPTIONS.get(name, {})}
        out[name] = str(write_yaml(folder / f"{name}.yaml", r))
    return out


def result(folder: Path) -> dict:
    """Everything a run's result is: adapters, metrics, graphs byte for byte; rounds and summary
    without their timings."""
    got = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
           if p.is_file() and (p.suffix in (".safetensors", ".npy") or p.name == "metrics.jsonl")}
    assert any(k.endswith(".safetensors") for k in got), f"no adapters in {folder}"

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMES}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    for name in ("rounds.json", "summary.json"):
        got[name] = strip(json.loads((folder / name).read_text()))
    return got


def _check_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        assert got[k] == want[k], f"{what}: {k} differs from the uninterrupted run's"


def _killed(res: dict) -> bool:
    return res["signal"] == signal.SIGKILL


@pytest.fixture(scope="module")
def references(server, configs, tmp_path_factory):
    """Each strategy's uninterrupted run (in a process from the same server)."""
    root = tmp_path_factory.mktemp("kill_refs")
    refs = {}
    for name, cfg in configs.items():
        res = server.run(["run", cfg, "--out", str(root / name), "-q"])
        assert res["code"] == 0, res["log"]
        refs[name] = (result(root / name), json.loads((root / name / "summary.json").read_text())["rounds"], res)
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_kill_after_and_during_a_checkpoint_then_resume(name, server, configs, references, tmp_path):
    want, rounds, _ = references[name]
    cfg = configs[name]
    # 1. killed right after the first checkpoint was renamed into place
    out = tmp_path / "after"
    res = server.run(["run", cfg, "--out", str(out), "-q"], kill_at=f"rename:{CHECKPOINT}:1")
    assert _killed(res), res
    assert torch.load(out / CHECKPOINT, weights_only=True)["round"] == 1 and not (out / "summary.json").exists()
    res = server.run(["run", "--resume", str(out), "-q"])
    assert res["code"] == 0, res["log"]
    _check_same(result(out), want, f"{name}, killed after checkpoint 1")
    # 2. killed in the middle of a checkpoint write: the temp file is written, the rename not done
    #    (the second checkpoint, so that the first one has to survive; oneshot has only one)
    n = 2 if rounds >= 2 else 1
    out = tmp_path / "during"
    res = server.run(["run", cfg, "--out", str(out), "-q"], kill_at=f"write:{CHECKPOINT}:{n}")
    assert _killed(res), res
    temps = [p.name for p in out.iterdir() if p.name.startswith(f".{CHECKPOINT}.")]
    assert temps, "the kill did not come during the checkpoint write"
    if n == 2:
        assert torch.load(out / CHECKPOINT, weights_only=True)["round"] == 1
    else:
        assert not (out / CHECKPOINT).exists()
    res = server.run(["run", "--resume", str(out), "-q"])
    assert res["code"] == 0, res["log"]
    assert not any(p.name.startswith(f".{CHECKPOINT}.") for p in out.iterdir()), "the stale temp file was left"
    _check_same(result(out), want, f"{name}, killed while writing checkpoint {n}")


def _state(folder: Path) -> str:
    """Where a kill left a run: for the test's report."""
    if not folder.exists():
        return "no folder"
    if not (folder / "config.yaml").exists():
        return "no config.yaml"
    if (folder / "summary.json").exists():
        return "finished (or finishing again)"
    if not (folder / CHECKPOINT).exists():
        return "before checkpoint 1"
    return f"after checkpoint {torch.load(folder / CHECKPOINT, weights_only=True)['round']}"


def _wait_for(path: Path, server: Server, limit: float = 60.0) -> float:
    """Seconds until ``path`` exists (polling), or until the limit."""
    t0 = time.perf_counter()
    while not path.exists() and time.perf_counter() - t0 < limit:
        time.sleep(0.002)
    return time.perf_counter() - t0


@pytest.mark.slow
def test_random_kills_never_leave_a_run_unresumable(server, configs, tmp_path):
    """20 SIGKILLs at random moments of a run's writing phase (one in each twentieth of the time from
    the run folder's creation to the end of an uninterrupted run): each killed run is continued
    (``--resume``, or its first command again when the kill came before ``config.yaml`` existed) and
    ends equal to the uninterrupted run. (Before the folder exists nothing is on disk to damage.)"""
    cfg = configs["mira"]  # the default algorithm; its graphs add files to write
    ref = tmp_path / "reference"
    server.start(["run", cfg, "--out", str(ref), "-q"])
    t_dir = _wait_for(ref, server)
    res = server.wait()
    assert res["code"] == 0
    want, took, writing = result(ref), res["seconds"], max(res["seconds"] - t_dir, 0.05)
    rng = random.Random(int(os.environ.get("MIRA_KILL_SEED", "15")))
    t0 = time.perf_counter()
    states: dict[str, int] = {}
    kills = tries = 0
    for i in range(RANDOM_KILLS):
        delay = (i + rng.random()) / RANDOM_KILLS * writing
        while True:  # a process that ends before its kill is tried again, killed sooner
            tries += 1
            assert tries <= 3 * RANDOM_KILLS, f"the kills keep missing: {states}"
            out = tmp_path / f"run_{tries:02d}"
            pid, _ = server.start(["run", cfg, "--out", str(out), "-q"])
            _wait_for(out, server)
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            res = server.wait()
            if _killed(res):
                break
            assert res["code"] == 0, res
            delay *= 0.6
        kills += 1
        state = _state(out)
        states[state] = states.get(state, 0) + 1
        again = ["run", "--resume", str(out), "-q"] if (out / "config.yaml").exists() else ["run", cfg, "--out",
                                                                                            str(out), "-q"]
        res = server.run(again)
        assert res["code"] == 0, f"kill {i} ({state}) left a run that {again} cannot continue: {res['log']}"
        _check_same(result(out), want, f"kill {i} ({state})")
    print(f"\n{kills} random kills ({tries} processes killed or not, {time.perf_counter() - t0:.1f} s; an "
          f"uninterrupted run writes for {writing:.2f} s of {took:.2f} s); where they came: {states}")
    assert kills == RANDOM_KILLS


def test_a_run_killed_while_writing_its_first_file_can_be_started_again(tiny_cfg, tmp_path, capsys):
    """Killed in the middle of writing config.yaml: the folder holds only that temp file. It is no
    run yet (``--resume`` says so), and the first command runs again; a folder with anything else
    in it is still refused."""
    from mira.cli import main

    dead = 4_194_304 + 12_345  # above Linux's largest pid
    out = tmp_path / "run"
    out.mkdir()
    (out / f".config.yaml.{dead}-ab12cd.tmp").write_text("half")
    cfg = str(write_yaml(tmp_path / "cfg.yaml", tiny_cfg))
    assert main(["run", "--resume", str(out), "-q"]) == 2
    assert "is not a mira run directory (no config.yaml)" in capsys.readouterr().err
    assert main(["run", cfg, "--out", str(out), "-q"]) == 0
    assert (out / "summary.json").exists() and not any(p.name.endswith(".tmp") for p in out.iterdir())
    other = tmp_path / "other"
    other.mkdir()
    (other / f".config.yaml.{dead}-ab12cd.tmp").write_text("half")
    (other / "notes.txt").write_text("mine")
    assert main(["run", cfg, "--out", str(other), "-q"]) == 2
    assert (other / "notes.txt").exists() and (other / f".config.yaml.{dead}-ab12cd.tmp").exists()
