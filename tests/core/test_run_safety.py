"""Issue 15: no traceback reaches a user, no run clobbers another, resume refuses what it cannot honour."""
import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mira.cli import main
from mira.errors import MiraError
from mira.federated.engine import CHECKPOINT
from mira.io import atomic_dir, atomic_write_text, clean_temp, make_temp_dir, recover_dir, replace_dir
from tests.conftest import write_yaml

DEAD_PID = 4_194_304 + 12_345  # above Linux's largest pid: never a running process


def _cfg(tiny_cfg, tmp_path, file="cfg.yaml", **algorithm):
    raw = copy.deepcopy(tiny_cfg)
    if algorithm:
        raw["algorithm"] = algorithm
    return str(write_yaml(tmp_path / file, raw))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, argv, code=2) -> str:
    got = main(argv)
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def good_run(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    assert main(["run", _cfg(tiny_cfg, tmp_path), "--out", str(out), "-q"]) == 0
    return out, _snapshot(out)


# -- 1. a new or failed run never damages an existing run directory ----------------------------------


def test_a_used_out_is_refused_without_overwrite(tiny_cfg, tmp_path, capsys, good_run):
    out, before = good_run
    cfg = _cfg(tiny_cfg, tmp_path, "fedit.yaml", name="fedit")
    err = _one_line_error(capsys, ["run", cfg, "--out", str(out), "-q"])
    assert f"--out: {out} exists and is not empty" in err and "--overwrite" in err
    assert _snapshot(out) == before and _siblings(out) == []


def test_an_unfinished_run_is_pointed_to_resume(tiny_cfg, tmp_path, capsys, good_run):
    out, _ = good_run
    (out / "summary.json").unlink()
    err = _one_line_error(capsys, ["run", _cfg(tiny_cfg, tmp_path), "--out", str(out), "-q"])
    assert f"mira run --resume {out}" in err


def test_overwrite_replaces_the_whole_folder(tiny_cfg, tmp_path, good_run):
    out, before = good_run
    assert (out / "graph.npy").exists()  # mira's
    cfg = _cfg(tiny_cfg, tmp_path, "fedit.yaml", name="fedit")
    assert main(["run", cfg, "--out", str(out), "-q", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["algorithm"] == "fedit"
    assert not (out / "graph.npy").exists() and not (out / "graphs").exists(), "the old run's files were left"
    assert _siblings(out) == []


def test_a_run_failing_in_round_one_leaves_the_old_run_intact(tiny_cfg, tmp_path, capsys, monkeypatch, good_run):
    out, before = good_run

    def boom(self, rnd, progress):
        raise MiraError("the data went away", where="round 1")

    monkeypatch.setattr("mira.federated.engine.Engine.run_round", boom)
    cfg = _cfg(tiny_cfg, tmp_path, "fedit.yaml", name="fedit")
    err = _one_line_error(capsys, ["run", cfg, "--out", str(out), "-q", "--overwrite"])
    assert "the data went away" in err
    assert _snapshot(out) == before
    assert _siblings(out) == [], "a partial run with nothing to resume was left behind"
    # into a new folder: the failed run removes what it wrote, so the same command can run again
    _one_line_error(capsys, ["run", cfg, "--out", str(tmp_path / "new"), "-q"])
    assert not (tmp_path / "new").exists()


def test_oneshot_merge_method_is_checked_before_anything_is_written(tiny_cfg, tmp_path, capsys, good_run):
    out, before = good_run
    cfg = _cfg(tiny_cfg, tmp_path, "one.yaml", name="oneshot", merge="bogus")
    err = _one_line_error(capsys, ["run", cfg, "--out", str(out), "-q", "--overwrite"])
    assert "algorithm.merge (oneshot): unknown merge method 'bogus'" in err
    assert _snapshot(out) == before and _siblings(out) == []
    cfg = _cfg(tiny_cfg, tmp_path, "one2.yaml", name="oneshot", merge="ties", merge_params={"densty": 0.5})
    assert "unknown merge parameters ['densty']" in _one_line_error(capsys, ["run", cfg, "--out", str(tmp_path / "n")])
    cfg = _cfg(tiny_cfg, tmp_path, "one3.yaml", name="oneshot", merge="dare")
    assert "dare needs a drop rate" in _one_line_error(capsys, ["run", cfg, "--out", str(tmp_path / "n")])
    assert not (tmp_path / "n").exists()


def test_a_killed_overwrite_run_is_resumable_and_then_replaces_the_old_one(tiny_cfg, tmp_path, capsys,
                                                                             monkeypatch, good_run):
    out, before = good_run
    cfg = _cfg(tiny_cfg, tmp_path, "fedit.yaml", name="fedit")
    assert main(["run", cfg, "--out", str(tmp_path / "reference"), "-q"]) == 0
    from mira.federated.engine import Engine

    real = Engine.run_round

    def interrupted(self, rnd, progress):
        if rnd == 2:
            raise KeyboardInterrupt
        return real(self, rnd, progress)

    monkeypatch.setattr(Engine, "run_round", interrupted)
    assert main(["run", cfg, "--out", str(out), "-q", "--overwrite"]) == 130
    err = capsys.readouterr().err
    partial = out.parent / f".run.partial-{os.getpid()}"
    assert f"mira run --resume {partial} continues it" in err
    assert _snapshot(out) == before, "the old run changed before the new one finished"
    # after a SIGKILL no message is printed: the next run into the same --out points at the partial run
    err = _one_line_error(capsys, ["run", cfg, "--out", str(out), "-q"])
    assert f"an unfinished --overwrite run is in {partial} (mira run --resume {partial} continues it)" in err
    monkeypatch.setattr(Engine, "run_round", real)
    assert main(["run", "--resume", str(partial), "-q"]) == 0
    assert not partial.exists() and _siblings(out) == []
    assert json.loads((out / "summary.json").read_text())["algorithm"] == "fedit"
    assert _rows(out) == _rows(tmp_path / "reference")


def test_compare_refuses_a_used_out_and_checks_every_spec_first(tiny_cfg, tmp_path, capsys):
    cfg = _cfg(tiny_cfg, tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", cfg, "-a", "local", "--set", "federation.rounds=1", "--out", str(out), "-q"]
    assert main(args) == 0
    before = _snapshot(out)
    assert f"{out} exists and is not empty" in _one_line_error(capsys, args)
    bad = ["compare", cfg, "-a", "local,oneshot:merge=bogus", "--out", str(out), "-q", "--overwrite"]
    assert "unknown merge method 'bogus'" in _one_line_error(capsys, bad)
    assert _snapshot(out) == before
    # into a new folder: nothing is written either (local does not run before oneshot is checked)
    _one_line_error(capsys, ["compare", cfg, "-a", "local,oneshot:merge=bogus", "--out", str(tmp_path / "cmp2"), "-q"])
    assert not (tmp_path / "cmp2").exists()
    assert main(["compare", cfg, "-a", "fedit", "--set", "federation.rounds=1", "--out", str(out), "-q",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fedit"] and _siblings(out) == []


def test_demo_replaces_its_own_output(monkeypatch, tmp_path):
    seen = {}

    def fake(cfg, specs, out, seeds, overwrite, progress):
        seen.update(out=out, overwrite=overwrite)
        return {"algorithms": {}}

    monkeypatch.setattr("mira.federated.cli._compare_into", fake)
    assert main(["demo", "--out", str(tmp_path / "demo"), "-q"]) == 0
    assert seen == {"out": tmp_path / "demo", "overwrite": True}


# -- 2. no traceback, no local variables -------------------------------------------------------------


def test_an_internal_error_is_one_line_and_its_traceback_a_file(tiny_cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIRA_CACHE", str(tmp_path / "cache"))

    def broken(path, overrides=()):
        api_key = "sk-FAKE-SECRET-1234"  # noqa: F841 - a local a pretty traceback would print
        raise RuntimeError("config reader broke")

    monkeypatch.setattr("mira.config.load_config", broken)
    err = _one_line_error(capsys, ["run", _cfg(tiny_cfg, tmp_path), "--out", str(tmp_path / "o"), "-q"], code=1)
    assert err.startswith("error: internal error: RuntimeError: config reader broke (traceback saved to ")
    assert "sk-FAKE-SECRET" not in err
    crash = Path(err.split("traceback saved to ", 1)[1].rstrip(")"))
    assert crash.parent == tmp_path / "cache" / "crash"
    text = crash.read_text()
    assert "Traceback" in text and "RuntimeError: config reader broke" in text and "sk-FAKE-SECRET" not in text


def test_no_typer_app_shows_locals():
    import typer

    import mira.cli

    mira.cli._register_all()
    apps = [mira.cli.app] + [g.typer_instance for g in mira.cli.app.registered_groups]
    assert len(apps) > 3
    for app in apps:
        assert isinstance(app, typer.Typer) and app.pretty_exceptions_show_locals is False


# -- 3. a checkpoint is data, never code ---------------------------------------------------------------

def _pwn(path):
    Path(path).write_text("code ran")
    return {}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _pwn, (self.marker,)


def test_checkpoint_loads_with_weights_only(tiny_cfg, tmp_path):
    out = tmp_path / "sim"
    cfg = _cfg(tiny_cfg, tmp_path, "sim.yaml", name="mira", graph="similarity")
    assert main(["run", cfg, "--out", str(out), "-q"]) == 0
    state = torch.load(out / CHECKPOINT, weights_only=True)  # numpy graphs are stored as tensors
    assert state["round"] == 2 and isinstance(state["strategy"]["graphs"][0]["__ndarray__"], torch.Tensor)


def test_a_checkpoint_that_would_run_code_is_refused(good_run, tmp_path, capsys):
    out, _ = good_run
    marker = tmp_path / "pwned"
    torch.save({"round": 1, "strategy": _Evil(str(marker))}, out / CHECKPOINT)
    err = _one_line_error(capsys, ["run", "--resume", str(out), "-q"])
    assert "not a readable mira checkpoint" in err and str(out / CHECKPOINT) in err
    assert not marker.exists(), "unpickling the checkpoint ran code"
    torch.load(out / CHECKPOINT, weights_only=False)  # the test's checkpoint really is hostile
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", "truncated"])
def test_a_corrupt_checkpoint_is_one_line(good_run, capsys, content):
    out, _ = good_run
    ck = out / CHECKPOINT
    ck.write_bytes(ck.read_bytes()[:300] if content == "truncated" else content)
    err = _one_line_error(capsys, ["run", "--resume", str(out), "-q"])
    assert "--resume:" in err and "not a readable mira checkpoint" in err


# -- 4. replacing a folder keeps the old or the new one -------------------------------------------------


def _folders(tmp_path):
    path, new = tmp_path / "out", tmp_path / "new"
    path.mkdir()
    (path / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    return path, new


def test_replace_dir_killed_between_the_renames_keeps_the_old(tmp_path, monkeypatch):
    path, new = _folders(tmp_path)
    import mira.io

    real, calls = mira.io._rename, []

    def rename(src, dst):  # the first rename happens, then the process is "dead": nothing else moves
        calls.append((src, dst))
        if len(calls) > 1:
            raise OSError("killed")
        real(src, dst)

    monkeypatch.setattr(mira.io, "_rename", rename)
    with pytest.raises(OSError):
        replace_dir(new, path)
    old = tmp_path / f".out.old-{os.getpid()}"
    assert not path.exists() and (old / "f").read_text() == "old" and (new / "f").read_text() == "new"
    monkeypatch.setattr(mira.io, "_rename", real)
    assert recover_dir(path) == old  # the next start puts it back
    assert (path / "f").read_text() == "old" and not old.exists()


def test_replace_dir_failing_on_the_second_rename_rolls_back(tmp_path, monkeypatch):
    path, new = _folders(tmp_path)
    import mira.io

    real, calls = mira.io._rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk trouble")
        real(src, dst)

    monkeypatch.setattr(mira.io, "_rename", rename)
    with pytest.raises(OSError):
        replace_dir(new, path)
    assert (path / "f").read_text() == "old" and _siblings(path) == []


def test_replace_dir_killed_while_deleting_the_old_keeps_the_new(tmp_path, monkeypatch):
    path, new = _folders(tmp_path)
    import mira.io

    real = mira.io._remove
    monkeypatch.setattr(mira.io, "_remove", lambda p: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        replace_dir(new, path)
    assert (path / "f").read_text() == "new"
    monkeypatch.setattr(mira.io, "_remove", real)
    recover_dir(path)
    assert (path / "f").read_text() == "new" and _siblings(path) == []


def test_atomic_dir_error_leaves_the_folder_and_no_temp(tmp_path):
    path, _ = _folders(tmp_path)
    with pytest.raises(ValueError), atomic_dir(path) as tmp:
        (tmp / "f").write_text("half")
        raise ValueError
    assert (path / "f").read_text() == "old" and _siblings(path) == []
    with atomic_dir(path) as tmp:
        (tmp / "g").write_text("new")
    assert [p.name for p in path.iterdir()] == ["g"] and _siblings(path) == []


def test_merge_overwrite_uses_the_safe_swap(tmp_path, monkeypatch):
    """``mira merge --overwrite`` goes through ``replace_dir`` (the merge tests cover the rest)."""
    import mira.merge.engine

    assert mira.merge.engine.replace_dir is replace_dir


# -- 5. a kill before the first checkpoint, temp files, permissions ---------------------------------------


def test_resume_without_checkpoint_starts_from_round_zero(good_run, capsys):
    out, before = good_run
    for name in (CHECKPOINT, "summary.json", "rounds.json", "metrics.jsonl"):
        (out / name).unlink()
    junk = [out / f".metrics.jsonl.{DEAD_PID}-ab12cd.tmp", out / ".summary.json.zz99yy.tmp",
            out / "adapters" / f".client_0.{DEAD_PID}-q1w2e3.tmpdir"]
    junk[0].write_text("half")
    junk[1].write_text("half")
    junk[2].mkdir()
    mine = out / f".rounds.json.{os.getpid()}-live00.tmp"  # a live process's temp file stays
    mine.write_text("busy")
    assert main(["run", "--resume", str(out), "-q"]) == 0, capsys.readouterr().err
    assert not any(p.exists() for p in junk) and mine.exists()
    mine.unlink()
    assert _snapshot(out) .keys() == before.keys()
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    assert (out / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]  # and the same run, exactly


def test_clean_temp_restores_an_interrupted_adapter_swap(tmp_path):
    root = tmp_path / "run"
    (root / "adapters" / f".client_0.old-{DEAD_PID}").mkdir(parents=True)
    (root / "adapters" / f".client_0.old-{DEAD_PID}" / "adapter_model.safetensors").write_text("x")
    (root / "adapters" / f".client_0.{DEAD_PID}-abc.tmpdir").mkdir()
    removed = clean_temp(root)
    assert (root / "adapters" / "client_0" / "adapter_model.safetensors").read_text() == "x"
    assert [p.name for p in removed] == [f".client_0.{DEAD_PID}-abc.tmpdir"]
    assert sorted(p.name for p in (root / "adapters").iterdir()) == ["client_0"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_outputs_follow_the_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert make_temp_dir(tmp_path / "e").stat().st_mode & 0o777 == 0o755
    os.umask(0o077)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


def test_a_run_directory_follows_the_umask(tiny_cfg, tmp_path, umask_022):
    out = tmp_path / "run"
    assert main(["run", _cfg(tiny_cfg, tmp_path, "fedit.yaml", name="fedit"), "--out", str(out), "-q", "--set",
                 "federation.rounds=1"]) == 0
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes["."] == 0o755 and modes["config.yaml"] == modes[CHECKPOINT] == modes["summary.json"] == 0o644
    assert modes["adapters/client_0"] == 0o755 and modes["adapters/client_0/adapter_model.safetensors"] == 0o644
    assert np.isfinite(json.loads((out / "summary.json").read_text())["mean_local_test_loss"])
