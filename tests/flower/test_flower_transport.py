"""A SuperNode started with the wrong transport for its SuperLink (``--insecure`` against TLS,
TLS against a plain-text SuperLink, or a CA that did not sign the SuperLink's certificate)
would retry without end and without a word (Flower's SuperNode does); ``mira flower supernode``
probes the SuperLink first and stops with one line. Real SuperLinks on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


def _node(fed, *args: str, timeout: float = 90) -> tuple[int, str]:
    """``mira flower supernode`` against ``fed``'s SuperLink; returns (exit code, output)."""
    from mira.federated.flower.launch import TAG

    cmd = [sys.executable, "-m", "mira", "flower", "supernode", "--partition-id", "0", "--num-partitions", "1",
           "--superlink", fed.address.address, *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, TAG: fed.tag, "COLUMNS": "400"})
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the group we started: the node hung, as Flower's does
        out, _ = p.communicate()
        pytest.fail(f"the node did not stop within {timeout:.0f}s: {out[-2000:]}")
    return p.returncode, out


def _error_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out
    return lines[0]


def test_an_insecure_node_against_a_tls_superlink_stops_with_one_line(federations, tmp_path):
    from mira.federated.flower.certs import generate_ca_and_server

    fed = federations(tls=True)
    fed.start_superlink()
    rc, out = _node(fed, "--insecure")
    assert rc == 2, out
    line = _error_line(out)
    assert f"the SuperLink at {fed.address.address} speaks TLS" in line and "--root-cert" in line, line
    assert "not --insecure" in line

    other = tmp_path / "other_ca"  # a CA that did not sign this SuperLink's certificate
    generate_ca_and_server(other)
    rc, out = _node(fed, "--root-cert", str(other / "ca.crt"))
    assert rc == 2, out
    line = _error_line(out)
    assert "speaks TLS but its certificate does not verify against" in line, line


def test_a_tls_node_against_a_plain_text_superlink_stops_with_one_line(federations, tmp_path):
    from mira.federated.flower.certs import generate_ca_and_server

    fed = federations()  # --insecure SuperLink
    fed.start_superlink()
    ca = tmp_path / "ca"
    generate_ca_and_server(ca)
    rc, out = _node(fed, "--root-cert", str(ca / "ca.crt"))
    assert rc == 2, out
    line = _error_line(out)
    assert f"the SuperLink at {fed.address.address} does not speak TLS" in line and "--insecure" in line, line


def test_the_probe_answers(federations):
    """``probe_tls`` on both kinds of SuperLink, and on a closed port."""
    from mira.federated.flower.launch import free_port
    from mira.federated.flower.node import check_superlink_transport, probe_tls

    fed = federations(tls=True)
    fed.start_superlink()
    assert probe_tls(fed.address.address) == "tls"
    assert probe_tls(fed.address.address, ca=str(fed.certs / "ca.crt")) == "tls"  # verifies, host 127.0.0.1
    closed = f"127.0.0.1:{free_port()}"
    assert probe_tls(closed).startswith("unreachable")
    notes: list[str] = []
    assert check_superlink_transport(closed, True, None, tries=2, interval=0.1, log=notes.append).startswith("unr")
    assert len(notes) == 1 and "not reachable yet" in notes[0]  # not an error: it may still be starting


def test_an_insecure_node_whose_superlink_comes_up_later_with_tls_stops_with_one_line(federations):
    """The SuperLink is not up when the node starts (not an error: the node starts and keeps
    trying); when it comes up speaking TLS, the node's watch finds the mismatch and the node stops
    with one line and exit code 2 instead of retrying silently forever."""
    import threading
    import time

    from mira.federated.flower.launch import TAG

    fed = federations(tls=True)
    cmd = [sys.executable, "-m", "mira", "flower", "supernode", "--partition-id", "0", "--num-partitions", "1",
           "--superlink", fed.address.address, "--insecure"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, TAG: fed.tag, "COLUMNS": "400"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("not reachable yet" in ln for ln in lines):  # past the start-up probes: running
            assert p.poll() is None and time.monotonic() < deadline, "".join(lines)[-2000:]
            time.sleep(0.2)
        fed.start_superlink()
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"the node did not stop after its SuperLink came up with TLS: {''.join(lines)[-2000:]}")
    reader.join(timeout=10)
    out = "".join(lines)
    assert p.returncode == 2, out
    line = _error_line(out)
    assert f"the SuperLink at {fed.address.address} speaks TLS" in line and "not --insecure" in line, line


def _listen_table() -> list[tuple[str, int, str]]:
    """(address, port, socket inode) of every LISTENing TCP socket (/proc/net/tcp and tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, p = f[1].split(":")
            if f[3] == "0A":  # LISTEN
                loopback = addr in ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")
                out.append(("127.0.0.1" if loopback else "0.0.0.0" if set(addr) == {"0"} else addr, int(p, 16), f[9]))
    return out


def _listening(port: int) -> set[str]:
    return {a for a, p, _ in _listen_table() if p == port}


def _listening_of(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of the sockets that processes ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return {(a, p) for a, p, ino in _listen_table() if ino in inodes}


def test_the_superlink_process_listens_on_loopback_and_refuses_an_exposed_address(federations, tmp_path):
    """Real ``mira flower superlink`` processes: with no --host it listens on 127.0.0.1 only; on
    0.0.0.0 with TLS but without node authentication it refuses to start (one line, exit 2) and
    nothing listens."""
    import time

    from mira.federated.flower.certs import generate_ca_and_server
    from mira.federated.flower.launch import TAG, free_port

    fed = federations()  # only for its process tag: the fixture removes anything left over
    env = {**os.environ, TAG: fed.tag, "COLUMNS": "400"}
    certs = tmp_path / "certs"
    generate_ca_and_server(certs)
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "mira", "flower", "superlink", "--host", "0.0.0.0", "--certs",
                        str(certs), "--port", str(port)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    line = _error_line(r.stdout + r.stderr)
    assert "node authentication" in line and "--insecure" in line, line
    assert _listening(port) == set()

    p = subprocess.Popen([sys.executable, "-m", "mira", "flower", "superlink", "--insecure", "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            assert p.poll() is None and time.monotonic() < deadline, "the SuperLink did not start"
            time.sleep(0.3)
        assert _listening(port) == {"127.0.0.1"}
        from mira.federated.flower.launch import tagged_pids

        time.sleep(2.0)  # every API up
        bound = _listening_of(tagged_pids(fed.tag))
        assert bound and all(a == "127.0.0.1" for a, _ in bound), bound  # no API on another address
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
