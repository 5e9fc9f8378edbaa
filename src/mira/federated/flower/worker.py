"""A warm node worker: one long-lived process per SuperNode that keeps the model loaded.

Flower 1.42 runs every message in a fresh ClientApp process (``flwr-clientapp`` runs one task
and exits), so each round every node would import torch/transformers/PEFT and load the base
model again (seconds on a small model, minutes on a large one). ``mira flower supernode
--warm`` (and ``mira flower local --warm``) instead starts

    worker (this module, holds one ``NodeRuntime`` per run, supervises the SuperNode)
      ├─ forkserver (``forkserver``: Flower and mira's ClientApp imported once)
      └─ python -m mira.federated.flower.supernode ... --node-config "... worker=<socket>"
           └─ SuperExec └─ flwr-clientapp shim (per message) -> ClientApp forked by the forkserver

The SuperNode is Flower's own ``flower_supernode()`` main with its idle poll capped
(``supernode``), and a ``flwr-clientapp`` shim is first on its ``PATH``, so each message's
ClientApp is forked from the fork server (``MIRA_FORKSERVER_OFF=1``, or an unreachable fork
server: the real ``flwr-clientapp``). The ClientApp, seeing ``worker`` in its node config,
forwards the decoded message to the worker over a private Unix socket
(``multiprocessing.connection`` with a random ``authkey``, the key file readable only by the
node's user) and returns its answer. The worker runs exactly the ``NodeRuntime`` code a cold
ClientApp runs; the Flower side (SuperNode, TLS, authentication, messages) is unchanged.
Stopping the worker process (SIGTERM/SIGINT) stops its SuperNode and its fork server.

The compute stays under Flower's lifecycle: the ClientApp that asked waits on the connection,
and when that ClientApp goes away before the answer (``flwr stop``, a Flower timeout, a killed
process), a watcher sees the connection close (checked every ``Worker.poll_s``, 0.2 s) and
stops the request's compute at its next Python step (``Cancelled`` raised in the serving
thread), logs it, and serves the next request; the ``NodeRuntime`` is kept (each fit sets the
adapter it was sent before training). A worker that crashes closes the connection, and the
waiting ClientApp fails its task with an error.

The same process supervises the SuperNode (``supervise``; ``--cold`` for the supervisor
alone, with neither worker nor fork server): when the SuperNode exits (e.g. its SuperLink was
restarted and no longer knows it), it is started again with bounded, logged back-off.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mira.errors import MiraError


def _key_path(address: str) -> Path:
    return Path(address + ".key")


def call(address: str, request: dict) -> dict:
    """Send one request to the worker at ``address`` and return its answer."""
    from multiprocessing.connection import Client

    try:
        key = _key_path(address).read_bytes()
        with Client(address, family="AF_UNIX", authkey=key) as conn:
            conn.send(request)
            # Wait in short slices: a signal meant to stop this ClientApp (Flower's task heartbeat
            # raises SIGINT from its own thread) is only acted on between Python steps of the
            # main thread, never while it is blocked in a read.
            while not conn.poll(0.25):
                pass
            answer = conn.recv()
    except (OSError, EOFError) as e:
        raise MiraError(f"the node's warm worker at {address} is not reachable: {e}") from None
    if "error" in answer:
        raise MiraError(f"node worker: {answer['error']}")
    return answer


class Cancelled(BaseException):
    """Raised in the serving thread when the ClientApp that asked has gone away (not an
    ``Exception``, so that no ``except Exception`` on the way swallows it)."""


def _raise_in(thread_id: int, exc: type[BaseException]) -> bool:
    """Raise ``exc`` in thread ``thread_id`` at its next Python bytecode (CPython's async exception)."""
    import ctypes

    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc)) == 1


class Worker:
    """Answers ``hello``/``fit``/``eval`` requests with a cached ``NodeRuntime``."""

    poll_s = 0.2  # how often the watcher checks that the asking ClientApp is still there

    def __init__(self):
        self.key = None
        self.runtime = None
        self.listener = None
        self.closed = False
        self.cancelled = 0  # requests stopped because their ClientApp went away

    def _runtime(self, text: str, cfg, spec):
        from mira.federated.flower.node import NodeRuntime

        key = (text, spec.partition_id, spec.num_partitions, spec.data_path)
        if self.key != key:
            self.runtime = None  # one run at a time: free the previous model first
            self.runtime = NodeRuntime(cfg, spec)
            self.key = key
        return self.runtime

    def handle(self, req: dict) -> dict:
        from mira.federated.flower.node import config_from_text, hello_info, node_spec
        from mira.federated.flower.protocol import FitTask

        text = req["mira_config"]
        cfg, spec = config_from_text(text), node_spec(req["node_config"])
        kind = req["kind"]
        if kind == "hello":
            return {"info": hello_info(cfg, spec)}
        rt = self._runtime(text, cfg, spec)
        if kind == "fit":
            buf, metrics = rt.fit(FitTask(**req["task"]))
            return {"buf": buf, "metrics": metrics}
        if kind == "fit_arrays":  # a SecAgg+ round (``secagg``)
            arrays, metrics = rt.fit_arrays(FitTask(**req["task"]), req["arrays"])
            return {"arrays": arrays, "metrics": metrics}
        if kind == "eval":
            losses, tokens, extra = rt.evaluate(req["bufs"], req["own"])
            return {"losses": losses, "tokens": tokens, "extra": extra}
        raise MiraError(f"unknown request {kind!r}")

    def serve(self, address: str) -> threading.Thread:
        """Listen on ``address`` (a new Unix socket) in a daemon thread."""
        from multiprocessing.connection import Listener

        key = os.urandom(32)
        kp = _key_path(address)
        fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        listener = self.listener = Listener(address, family="AF_UNIX", authkey=key)
        os.chmod(address, 0o600)

        def loop():
            while not self.closed:
                try:
                    conn = listener.accept()
                except Exception:  # noqa: BLE001, S112 - a client that failed authentication, or close()
                    continue
                with conn:
                    try:
                        req = conn.recv()
                        done = threading.Event()
                        watcher = threading.Thread(target=self._watch, args=(conn, done, threading.get_ident()),
                                                   name="mira-node-worker-watch", daemon=True)
                        watcher.start()
                        try:
                            try:
                                answer = self.handle(req)
                            except Exception as e:  # noqa: BLE001 - reported to the ClientApp
                                answer = {"error": f"{type(e).__name__}: {e}"}
                            finally:
                                done.set()
                            watcher.join()
                        except Cancelled:
                            done.set()
                            self.cancelled += 1
                            _say(f"worker: {req.get('kind')} request cancelled: its ClientApp went away")
                            continue
                        conn.send(answer)
                    except Cancelled:  # raised just after the compute ended: nothing to stop
                        self.cancelled += 1
                    except (OSError, EOFError):
                        pass

        t = threading.Thread(target=loop, name="mira-node-worker", daemon=True)
        t.start()
        return t

    def _watch(self, conn, done: threading.Event, thread_id: int) -> None:
        """Until ``done``: if the asking ClientApp closes the connection (it sends nothing more,
        so a readable connection means it is gone), stop the compute in ``thread_id``."""
        while not done.wait(self.poll_s):
            try:
                gone = conn.poll()
            except (OSError, EOFError):
                gone = True
            if gone and not done.is_set():
                _raise_in(thread_id, Cancelled)
                return

    def close(self) -> None:
        """Stop listening and remove the socket (the accept thread is a daemon and ends with the process)."""
        self.closed = True
        if self.listener is not None:
            try:
                self.listener.close()
            except OSError:
                pass


def _preload() -> None:
    """Import the heavy modules ahead of the first request (while the SuperNode connects)."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401

        import mira.federated.engine  # noqa: F401
        import mira.federated.flower.node  # noqa: F401
        import mira.models.loader  # noqa: F401
    except Exception:  # noqa: BLE001, S110 - the first request reports the import error
        pass


def with_worker(node_config: str, address: str) -> str:
    return f'{node_config} worker="{address}"'.strip()


# -- the node supervisor: restart the SuperNode when it exits, with bounded back-off ----------
# A SuperNode that loses its SuperLink retries the connection itself (Flower's own back-off,
# at most 20 s between tries, logged "Connection attempt failed, retrying in ..."). But a
# restarted SuperLink (in-memory state) no longer knows the node's id: Flower 1.42's SuperNode
# then exits with code 0 ("SuperNode terminated gracefully") within seconds and nothing
# resumes. The supervisor starts it again, waiting BACKOFF_BASE * 2**n seconds (at most
# BACKOFF_MAX) after the n-th quick exit in a row, and gives up after ``max_restarts``
# restarts in a row that did not stay up HEALTHY_S seconds. Exit codes that no restart can
# fix (a key the SuperLink refuses, TLS without a matching CA, node auth on plain text) end it.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
HEALTHY_S = 60.0
MAX_RESTARTS = 10
WATCH_INTERVAL = 2.0  # seconds between probes of a SuperLink that was not reachable at the node's start
# Flower's exit codes (``flwr.supercore.exit.ExitCode``) as a process sees them: modulo 256.
PERMANENT = {302 % 256: "Flower exit code 302: the node's auth key is invalid",
             303 % 256: "Flower exit code 303: node authentication needs TLS",
             304 % 256: "Flower exit code 304: the trusted-entities file is invalid",
             305 % 256: "Flower exit code 305: the SuperLink refused the connection (an unregistered key, or a "
                        "TLS/CA mismatch)"}


def _say(msg: str) -> None:
    import time

    print(f"[mira supervisor {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def backoff(n: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait before the restart that follows the ``n``-th quick exit in a row (n >= 1)."""
    return min(cap, base * 2 ** max(0, n - 1))


def supervise(cmd: list[str], max_restarts: int = MAX_RESTARTS, base: float = BACKOFF_BASE,
              cap: float = BACKOFF_MAX, healthy_s: float = HEALTHY_S, env: dict | None = None,
              watch=None, watch_interval: float = WATCH_INTERVAL) -> int:
    """Run ``cmd`` (a ``flower-supernode`` command line) until told to stop (SIGTERM/SIGINT, passed
    on to it), restarting it when it exits (see above); returns its last exit code.

    ``watch`` (``node.TransportWatch``, for a node whose SuperLink was not reachable at start) is
    called every ``watch_interval`` seconds until it says ``"ok"``; when it returns an error line
    instead (the SuperLink came up speaking the other transport), the SuperNode is stopped, the
    line printed, and 2 returned."""
    import time

    stop = threading.Event()
    state: dict = {"child": None, "error": None}

    def watcher():
        while not stop.wait(watch_interval):
            try:
                verdict = watch()
            except Exception as e:  # noqa: BLE001 (a probe that cannot run is not a verdict)
                _say(f"the SuperLink transport check failed ({type(e).__name__}: {e}); not checking it again")
                return
            if verdict == "ok":
                return
            if verdict.startswith("error"):
                state["error"] = verdict
                stop.set()
                child = state["child"]
                if child is not None and child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                return

    if watch is not None:
        threading.Thread(target=watcher, daemon=True).start()
    tag = os.environ.get("MIRA_FLOWER_TAG", "")[:12]
    status_dir = tempfile.mkdtemp(prefix=f"mira-worker-{tag}-" if tag else "mira-worker-")
    status_file = os.path.join(status_dir, "flower-exit-code")
    env = {**(os.environ if env is None else env), "MIRA_SUPERNODE_STATUS": status_file}

    def on_signal(signum, frame):
        stop.set()
        child = state["child"]
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    quick = 0  # exits in a row that came sooner than healthy_s after the start
    try:
        while True:
            t0 = time.monotonic()
            try:
                os.unlink(status_file)
            except OSError:
                pass
            child = state["child"] = subprocess.Popen(cmd, env=env)
            if state["error"] and child.poll() is None:  # the watcher fired while no child was running
                child.send_signal(signal.SIGTERM)
            rc = child.wait()
            if state["error"]:
                print(state["error"], file=sys.stderr, flush=True)
                return 2
            if stop.is_set():
                return rc
            ran = time.monotonic() - t0
            try:  # the Flower exit code (the process exits 1 for all of them), from mira's entry point
                with open(status_file) as f:
                    flower_code = int(f.read().strip()) % 256
            except (OSError, ValueError):
                flower_code = rc
            if flower_code in PERMANENT:
                _say(f"the SuperNode exited with code {rc}: {PERMANENT[flower_code]}; not restarting it")
                return rc or 1
            quick = quick + 1 if ran < healthy_s else 1
            if quick > max_restarts:
                _say(f"the SuperNode exited {quick} times in a row within {healthy_s:g}s of starting (last code "
                     f"{rc}); giving up after {max_restarts} restarts")
                return rc or 1
            wait = backoff(quick, base, cap)
            _say(f"the SuperNode exited with code {rc} after {ran:.1f}s (the SuperLink restarted or dropped it); "
                 f"restart {quick} of at most {max_restarts} in {wait:.1f}s")
            if stop.wait(wait):
                if state["error"]:
                    print(state["error"], file=sys.stderr, flush=True)
                    return 2
                return rc
    finally:
        stop.set()  # ends the watcher too
        child = state["child"]
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        import shutil

        shutil.rmtree(status_dir, ignore_errors=True)


def run(supernode_cmd: list[str], warm: bool = True, max_restarts: int = MAX_RESTARTS, watch=None) -> int:
    """Start the worker (``warm``), then ``supernode_cmd`` (a ``flower-supernode`` command line whose
    ``--node-config`` gets ``worker=<socket>``) under the supervisor; return its exit code."""
    cmd = list(supernode_cmd)
    if "--node-config" not in cmd:
        raise MiraError("the SuperNode command has no --node-config", where="--node-config")
    if os.path.basename(cmd[0]) == "flower-supernode":  # the same main, with the idle poll capped
        cmd = [sys.executable, "-m", "mira.federated.flower.supernode", *cmd[1:]]
    if not warm:
        return supervise(cmd, max_restarts, watch=watch)
    tag = os.environ.get("MIRA_FLOWER_TAG", "")[:12]  # set by LocalFederation, which removes leftovers
    sock_dir = tempfile.mkdtemp(prefix=f"mira-worker-{tag}-" if tag else "mira-worker-")
    address = os.path.join(sock_dir, "worker.sock")
    worker = Worker()
    worker.serve(address)
    threading.Thread(target=_preload, daemon=True).start()
    i = cmd.index("--node-config") + 1
    cmd[i] = with_worker(cmd[i], address)
    env, forks = None, None
    if os.environ.get("MIRA_FORKSERVER_OFF", "") not in ("1", "true"):  # ClientApps forked from a warm process
        from mira.federated.flower import forkserver
        from mira.federated.flower.bundle import flower_bin

        shim_dir = os.path.join(sock_dir, "bin")
        os.mkdir(shim_dir, 0o700)
        forkserver.write_shim(shim_dir, flower_bin("flwr-clientapp"))
        fs_address = os.path.join(sock_dir, "fork.sock")
        forks = subprocess.Popen([sys.executable, "-m", "mira.federated.flower.forkserver", fs_address])
        env = {**os.environ, forkserver.ENV: fs_address, forkserver.REAL: flower_bin("flwr-clientapp"),
               "PATH": os.pathsep.join([shim_dir, os.environ.get("PATH", "")])}
    try:
        return supervise(cmd, max_restarts, env=env, watch=watch)
    finally:
        if forks is not None:
            forks.terminate()
            try:
                forks.wait(timeout=5)
            except subprocess.TimeoutExpired:
                forks.kill()
            import shutil

            shutil.rmtree(os.path.join(sock_dir, "bin"), ignore_errors=True)
            try:
                os.unlink(os.path.join(sock_dir, "fork.sock"))
            except OSError:
                pass
        worker.close()
        try:
            os.unlink(_key_path(address))
        except OSError:
            pass
        try:
            os.rmdir(sock_dir)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m mira.federated.flower.worker [--cold] [--max-restarts N] [--] flower-supernode ARGS...``

    ``--cold``: only the supervisor (no warm worker; each message loads the model afresh)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warm, max_restarts = True, MAX_RESTARTS
    while argv and argv[0].startswith("--"):
        opt = argv.pop(0)
        if opt == "--":
            break
        if opt == "--cold":
            warm = False
        elif opt == "--max-restarts" and argv:
            try:
                max_restarts = int(argv.pop(0))
            except ValueError:
                argv = []
                break
        else:
            argv = []
            break
    if not argv:
        print("usage: python -m mira.federated.flower.worker [--cold] [--max-restarts N] [--] "
              "flower-supernode [ARGS...]", file=sys.stderr)
        return 2
    try:
        return run(argv, warm=warm, max_restarts=max_restarts)
    except MiraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
