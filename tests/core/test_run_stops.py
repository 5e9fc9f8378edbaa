"""Issue 15: a run that cannot go on stops in one line, exit code 2, its last checkpoint intact and
resumable: when every update of a round is rejected (NaN/Inf: the training diverged), and when the
disk is full (simulated, and on a real small tmpfs where this machine lets the test mount one)."""
import copy
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mira.cli import main
from mira.federated.engine import CHECKPOINT, Engine
from tests.conftest import write_yaml


def _cfg(tiny_cfg, tmp_path, name="fedit", file="cfg.yaml", **federation):
    raw = copy.deepcopy(tiny_cfg)
    raw["algorithm"] = {"name": name}
    raw["federation"].update(federation)
    return str(write_yaml(tmp_path / file, raw))


def _error(capsys, argv, code=2) -> str:
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _result(run: Path) -> dict:
    files = sorted((run / "adapters").glob("*/adapter_model.safetensors")) + [run / "metrics.jsonl"]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def _temps(run: Path) -> list[str]:
    return [p.name for p in run.rglob("*") if p.name.endswith((".tmp", ".tmpdir"))]


# -- every update of a round rejected ------------------------------------------------------------------


def test_a_run_that_diverges_in_round_2_stops_cleanly(tiny_cfg, tmp_path, capsys):
    """A learning rate of 1e4 without clipping: round 1 is finite, every client's round-2 update is NaN."""
    cfg = _cfg(tiny_cfg, tmp_path, lr=1e4, grad_clip=None, rounds=3)
    out = tmp_path / "run"
    err = _error(capsys, ["run", cfg, "--out", str(out), "-q"])
    assert err.startswith("error: round 2: every update had NaN/Inf values (client(s) 0, 1, 2, 3), the training "
                          "diverged and the run stopped; the checkpoint of round 1 is intact")
    assert f"mira run --resume {out} --set federation.lr=... --allow-changed federation.lr" in err
    assert torch.load(out / CHECKPOINT, weights_only=True)["round"] == 1 and not (out / "summary.json").exists()
    # the way out the message names
    assert main(["run", "--resume", str(out), "-q", "--set", "federation.lr=0.01", "--allow-changed",
                 "federation.lr"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3


@pytest.fixture
def poison(monkeypatch):
    """Every client update from round ``poison["from"]`` on is NaN."""
    import mira.federated.engine as eng

    state = {"from": 2, "round": 0}
    real_round, real_fit = Engine.run_round, eng.client_fit

    def run_round(self, rnd, progress):
        state["round"] = rnd
        return real_round(self, rnd, progress)

    def client_fit(*args, **kwargs):
        adapter, res = real_fit(*args, **kwargs)
        if state["round"] >= state["from"]:
            adapter = {k: torch.full_like(v, float("nan")) for k, v in adapter.items()}
        return adapter, res

    monkeypatch.setattr(Engine, "run_round", run_round)
    monkeypatch.setattr(eng, "client_fit", client_fit)
    return state


@pytest.mark.parametrize("name", ["fedit", "mira", "centralized", "fedadam"])
def test_every_update_rejected_stops_with_the_last_checkpoint(tiny_cfg, tmp_path, capsys, poison, name):
    cfg = _cfg(tiny_cfg, tmp_path, name, rounds=3)
    assert main(["run", cfg, "--out", str(tmp_path / "reference"), "-q", "--set", "federation.rounds=1"]) == 0
    ck1 = torch.load(tmp_path / "reference" / CHECKPOINT, weights_only=True)
    out = tmp_path / "run"
    err = _error(capsys, ["run", cfg, "--out", str(out), "-q"])
    who = "the pooled update" if name == "centralized" else "client(s) 0, 1, 2, 3"
    assert f"round 2: every update had NaN/Inf values ({who})" in err and "checkpoint of round 1 is intact" in err
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["round"] == 1
    assert all(torch.equal(a, b) for a, b in zip(_tensors(state["strategy"]), _tensors(ck1["strategy"])))
    assert not (out / "summary.json").exists() and _temps(out) == []
    # once the cause is gone the run continues from its checkpoint, exactly
    poison["from"] = 10**6
    assert main(["run", cfg, "--out", str(tmp_path / "full"), "-q"]) == 0
    assert main(["run", "--resume", str(out), "-q"]) == 0
    assert _result(out) == _result(tmp_path / "full")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_every_update_rejected_in_round_1_leaves_nothing(tiny_cfg, tmp_path, capsys, poison):
    poison["from"] = 1
    out = tmp_path / "run"
    err = _error(capsys, ["run", _cfg(tiny_cfg, tmp_path, "oneshot"), "--out", str(out), "-q"])
    assert "round 1: every update had NaN/Inf values" in err and "no round had finished, so there is nothing" in err
    assert not out.exists()  # a new run with nothing to resume is removed, as after any failure


def test_some_updates_rejected_is_not_a_stop(tiny_cfg, tmp_path, monkeypatch):
    import mira.federated.engine as eng

    real = eng.client_fit

    def client_fit(slot, trainer, data, ins, seed, *rest):
        adapter, res = real(slot, trainer, data, ins, seed, *rest)
        if data is eng_ws[0].train[1]:
            adapter = {k: torch.full_like(v, float("inf")) for k, v in adapter.items()}
        return adapter, res

    eng_ws = []
    real_init = Engine.__init__

    def init(self, ws, *a, **k):
        eng_ws[:] = [ws]
        real_init(self, ws, *a, **k)

    monkeypatch.setattr(Engine, "__init__", init)
    monkeypatch.setattr(eng, "client_fit", client_fit)
    out = tmp_path / "run"
    assert main(["run", _cfg(tiny_cfg, tmp_path), "--out", str(out), "-q"]) == 0
    rejected = json.loads((out / "summary.json").read_text())["rejected_updates"]
    assert rejected == [{"round": 1, "client": 1}, {"round": 2, "client": 1}]


# -- a full disk ---------------------------------------------------------------------------------------------


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(tiny_cfg, tmp_path, capsys, monkeypatch):
    """ENOSPC from the file under ``torch.save`` (which makes a ``RuntimeError: unexpected pos`` of it) at
    the second checkpoint: one line, exit 2, the first checkpoint as it was; after space is freed
    ``--resume`` ends as the uninterrupted run."""
    import mira.io

    cfg = _cfg(tiny_cfg, tmp_path)
    assert main(["run", cfg, "--out", str(tmp_path / "full"), "-q"]) == 0
    full = {"on": False}
    real_write, real_ck = mira.io._Writer.write, Engine.checkpoint

    def write(self, data):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    saved = {}

    def checkpoint(self):
        real_ck(self)
        saved["bytes"] = (self.out / CHECKPOINT).read_bytes()
        full["on"] = True  # the disk fills up during round 2

    monkeypatch.setattr(mira.io._Writer, "write", write)
    monkeypatch.setattr(Engine, "checkpoint", checkpoint)
    out = tmp_path / "run"
    err = _error(capsys, ["run", cfg, "--out", str(out), "-q"])
    assert err == (f"error: no space left on device (writing {out / CHECKPOINT}); the checkpoint of round 1 is "
                   f"intact: free some space, then mira run --resume {out} continues it")
    assert (out / CHECKPOINT).read_bytes() == saved["bytes"] and _temps(out) == []
    monkeypatch.undo()
    assert main(["run", "--resume", str(out), "-q"]) == 0
    assert _result(out) == _result(tmp_path / "full")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs, where this machine lets the test mount one (as root, e.g. in a container)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                            capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        pytest.skip("cannot mount a tmpfs here (needs root); test_a_full_disk_at_a_checkpoint_... simulates ENOSPC")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(folder: Path) -> Path:
    """Fill ``folder``'s file system to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("after_round", [1, 2], ids=["at-checkpoint-2", "writing-the-adapters"])
def test_a_real_full_disk_stops_in_one_line(tiny_cfg, tmp_path, small_disk, capsys, monkeypatch, after_round):
    """On a tmpfs filled to the last byte after checkpoint 1 (checkpoint 2's temp file cannot be
    written) or after the last checkpoint (the adapters cannot be saved)."""
    cfg = _cfg(tiny_cfg, tmp_path, "mira")
    assert main(["run", cfg, "--out", str(tmp_path / "full"), "-q"]) == 0
    real_ck, fillers, saved = Engine.checkpoint, [], {}

    def checkpoint(self):
        real_ck(self)
        if self.round == after_round:
            saved["bytes"] = (self.out / CHECKPOINT).read_bytes()
            fillers.append(_fill(small_disk))

    monkeypatch.setattr(Engine, "checkpoint", checkpoint)
    out = small_disk / "run"
    err = _error(capsys, ["run", cfg, "--out", str(out), "-q"])
    assert err.startswith("error: no space left on device (writing ") and str(out) in err, err
    assert err.endswith(f"the checkpoint of round {after_round} is intact: free some space, then mira run --resume "
                        f"{out} continues it")
    assert fillers and (out / CHECKPOINT).read_bytes() == saved["bytes"] and _temps(out) == []
    monkeypatch.undo()
    fillers[0].unlink()
    assert main(["run", "--resume", str(out), "-q"]) == 0
    assert _result(out) == _result(tmp_path / "full")
