"""The ClientApp fork server (``mira.federated.flower.forkserver``) without Flower: a fork server
whose children run a stand-in for ``flwr_clientapp``, driven through the real shim. Exit codes
and signals must reach the SuperExec through the shim exactly as from Flower's own process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mira.federated.flower import forkserver

SERVER = textwrap.dedent('''
    import os, sys, time

    def main():  # what the fork server's children run instead of Flower's flwr_clientapp
        what = sys.argv[1]
        print("child", os.getpid(), os.getcwd(), os.environ.get("PROBE"), flush=True)
        if what == "exit":
            sys.exit(int(sys.argv[2]))
        if what == "raise":
            raise RuntimeError("boom")
        if what == "sleep":
            with open(sys.argv[2], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)

    from mira.federated.flower.forkserver import serve
    serve(sys.argv[1], main=main, preload=False)
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(cond, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fs")
    os.chmod(d, 0o700)
    address = str(d / "fork.sock")
    script = d / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), address], stderr=subprocess.PIPE)
    assert _wait_for(lambda: os.path.exists(address) or proc.poll() is not None, 60), "fork server did not start"
    assert proc.poll() is None, proc.stderr.read().decode()
    bindir = d / "bin"
    bindir.mkdir()
    shim = forkserver.write_shim(str(bindir), "/nonexistent/flwr-clientapp")
    yield address, shim, d
    proc.terminate()
    proc.wait(timeout=10)
    assert not os.path.exists(address)


def _shim(fork_server, *args, env=None, **kw) -> subprocess.Popen:
    address, shim, d = fork_server
    return subprocess.Popen([shim, *args], env={**os.environ, forkserver.ENV: address, "PROBE": "p1", **(env or {})},
                            cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_exit_code_and_stdio_come_back_through_the_shim(fork_server):
    p = _shim(fork_server, "exit", "3")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 3, err.decode()
    pid = int(out.split()[1])
    assert pid != p.pid  # it ran in a forked child, with the shim's stdout, cwd and environment
    assert out.decode().split()[2:] == [str(fork_server[2]), "p1"]
    p = _shim(fork_server, "exit", "0")
    assert p.wait(timeout=30) == 0


def test_a_crashed_child_fails(fork_server):
    p = _shim(fork_server, "raise")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert b"RuntimeError: boom" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_shim_stops_its_child(fork_server, sig):
    """SIGTERM (``flwr stop``, a SuperExec stopping its task) is passed on; a shim killed outright
    (SIGKILL) leaves no ClientApp behind either: the fork server sees its connection close."""
    pidfile = Path(fork_server[2]) / f"child-{sig}.pid"
    p = _shim(fork_server, "sleep", str(pidfile))
    assert _wait_for(lambda: pidfile.exists() and pidfile.read_text() != ""), "the child did not start"
    child = int(pidfile.read_text())
    assert _alive(child)
    p.send_signal(sig)
    p.communicate(timeout=30)
    assert p.returncode == -sig
    assert _wait_for(lambda: not _alive(child), 15), f"child {child} survived its shim"


def test_without_a_fork_server_the_shim_runs_the_real_clientapp(fork_server, tmp_path):
    real = tmp_path / "flwr-clientapp"
    real.write_text("#!/bin/sh\necho real \"$@\"\nexit 5\n")
    real.chmod(0o700)
    p = _shim(fork_server, "a", "b", env={forkserver.ENV: str(tmp_path / "none.sock"), forkserver.REAL: str(real)})
    out, err = p.communicate(timeout=30)
    assert p.returncode == 5 and out == b"real a b\n"
    assert b"fork server not reachable" in err


def test_forked_clientapps_retry_unavailable_objects_quickly():
    """A forked ClientApp asks for its message before its SuperNode has downloaded it: Flower's
    1 s (doubling) first retry wait is cut to ``PULL_BACKOFF`` in the fork server."""
    rc = pytest.importorskip("flwr.supernode.runtime.run_clientapp")
    defaults = rc.pull_and_inflate_object_from_tree.__kwdefaults__
    saved = dict(defaults)
    try:
        assert forkserver._shorten_pull_backoff()
        assert (defaults["initial_backoff"], defaults["backoff_cap"]) == forkserver.PULL_BACKOFF
    finally:
        defaults.clear()
        defaults.update(saved)
