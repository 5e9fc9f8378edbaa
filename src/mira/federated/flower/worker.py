"""A warm node worker: one long-lived process per SuperNode that keeps the model loaded.

Flower 1.41 runs every message in a fresh ClientApp process, so each round every node
imports torch/transformers/PEFT and loads the base model again (seconds on a small
model, minutes on a large one). ``mira flower supernode --warm`` instead starts

    worker (this module, holds one ``NodeRuntime`` per run)
      └─ flower-supernode ... --node-config "... worker=<socket>"
           └─ SuperExec └─ ClientApp (per message)

and the ClientApp, seeing ``worker`` in its node config, forwards the decoded message
to the worker over a private Unix socket (``multiprocessing.connection`` with a random
``authkey``, the key file readable only by the node's user) and returns its answer.
The worker runs exactly the ``NodeRuntime`` code a cold ClientApp runs; the Flower
side (SuperNode, TLS, authentication, messages) is unchanged. Stopping the worker
process (SIGTERM/SIGINT) stops its SuperNode.
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
            answer = conn.recv()
    except (OSError, EOFError) as e:
        raise MiraError(f"the node's warm worker at {address} is not reachable: {e}") from None
    if "error" in answer:
        raise MiraError(f"node worker: {answer['error']}")
    return answer


class Worker:
    """Answers ``hello``/``fit``/``eval`` requests with a cached ``NodeRuntime``."""

    def __init__(self):
        self.key = None
        self.runtime = None
        self.listener = None
        self.closed = False

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
                        try:
                            answer = self.handle(req)
                        except Exception as e:  # noqa: BLE001 - reported to the ClientApp
                            answer = {"error": f"{type(e).__name__}: {e}"}
                        conn.send(answer)
                    except (OSError, EOFError):
                        pass

        t = threading.Thread(target=loop, name="mira-node-worker", daemon=True)
        t.start()
        return t

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


def run(supernode_cmd: list[str]) -> int:
    """Start the worker, then ``supernode_cmd`` (a ``flower-supernode`` command line whose
    ``--node-config`` gets ``worker=<socket>``); return its exit code."""
    cmd = list(supernode_cmd)
    if "--node-config" not in cmd:
        raise MiraError("the SuperNode command has no --node-config", where="--node-config")
    tag = os.environ.get("MIRA_FLOWER_TAG", "")[:12]  # set by LocalFederation, which removes leftovers
    sock_dir = tempfile.mkdtemp(prefix=f"mira-worker-{tag}-" if tag else "mira-worker-")
    address = os.path.join(sock_dir, "worker.sock")
    worker = Worker()
    worker.serve(address)
    threading.Thread(target=_preload, daemon=True).start()
    i = cmd.index("--node-config") + 1
    cmd[i] = with_worker(cmd[i], address)
    child = subprocess.Popen(cmd)

    def stop(signum, frame):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return child.wait()
    finally:
        if child.poll() is None:
            child.kill()
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
    """``python -m mira.federated.flower.worker flower-supernode ARGS...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m mira.federated.flower.worker flower-supernode [ARGS...]", file=sys.stderr)
        return 2
    try:
        return run(argv)
    except MiraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
