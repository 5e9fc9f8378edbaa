"""``flower-supernode`` with a shorter idle poll (``python -m mira.federated.flower.supernode ARGS``).

Flower 1.42's SuperNode waits a fixed 3 s (``time.sleep(3)`` in
``flwr.supernode.start_client_internal``) before it asks the SuperLink again when there was no
message, and 0.5 s between checks for a finished reply: on average 1.5 s of every message's
latency, up to 3 s, with nothing to configure. This entry point runs Flower's own
``flower_supernode()`` main, unchanged, with those waits capped at ``MIRA_SUPERNODE_POLL``
seconds (``bundle.POLL_ENV``: 0.3, as ``mira flower local`` and ``mira flower supernode`` set
it). Each poll is one small HTTPS request to the SuperLink: 0.3 s is ~3 requests a second
per node, fine for tens of nodes; raise it for a large federation. Unset, or >= 3: Flower's
behaviour exactly. Should a Flower release rename what is patched, the SuperNode runs
unpatched (and says so).

It also watches for a run that was stopped (``flwr stop``) while one of its ClientApps runs
(``RunStopWatch``). Flower 1.42's SuperNode does not notice: its task stays RUNNING in the
node's state, the ClientApp's task heartbeat keeps being accepted, and the compute runs to the
end. While it waits for a ClientApp's reply, this SuperNode asks the SuperLink for the run every
``MIRA_SUPERNODE_RUN_CHECK`` seconds (3; Flower's own ``GetRun`` over the node's own
authenticated connection, in a thread of its own). Once the SuperLink says the run is no longer
running, the run's tasks are marked finished (``stopped``) in the node's state, so the
ClientApp's next task heartbeat is refused and Flower stops the ClientApp (its SIGINT); the
run's replies and objects are dropped, and the SuperNode goes back to pulling messages instead
of waiting for a reply that will not come.
"""
from __future__ import annotations

import os
import sys
import time

POLL = "MIRA_SUPERNODE_POLL"
RUN_CHECK = "MIRA_SUPERNODE_RUN_CHECK"  # seconds between "is the run still running?" while a ClientApp runs
# Where to write the Flower exit code (``flwr_exit``'s "Exit Code: 305") when the SuperNode gives up:
# the process itself exits with 1 for every such error, so the supervisor reads the code here.
STATUS = "MIRA_SUPERNODE_STATUS"


class _SupernodeTime:
    """``time`` for ``start_client_internal``: ``sleep`` waits at most ``cap`` seconds (None: as
    asked), and calls ``on_sleep`` first (the run-stop watch, which may raise)."""

    def __init__(self, cap: float | None, on_sleep=None):
        self.cap = cap
        self.on_sleep = on_sleep

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if self.on_sleep is not None:
            self.on_sleep()
        time.sleep(float(seconds) if self.cap is None else min(float(seconds), self.cap))


def _sci():
    try:
        import flwr.supernode.start_client_internal as sci
    except ImportError:
        return None
    if getattr(sci, "time", None) is not time and not isinstance(getattr(sci, "time", None), _SupernodeTime):
        print("[mira supernode] flwr.supernode.start_client_internal has no `time` to patch; idle poll left "
              "at Flower's 3 s and stopped runs not watched", file=sys.stderr, flush=True)
        return None
    return sci


def _patched_time(sci) -> _SupernodeTime:
    if not isinstance(sci.time, _SupernodeTime):
        sci.time = _SupernodeTime(None)
    return sci.time


class _RunStopped(Exception):
    """Raised in the SuperNode's wait for a reply when the run no longer runs at the SuperLink."""

    def __init__(self, run_id: int):
        super().__init__(f"run {run_id} is no longer running at the SuperLink")


class RunStopWatch:
    """While the SuperNode waits for a ClientApp's reply, ask the SuperLink (every ``every``
    seconds) whether the run still runs; when not, finish the run's tasks as ``stopped`` in the
    node's state (Flower then stops the ClientApp at its next task heartbeat), free what the node
    holds of the run, and stop waiting.

    It wraps two functions of ``flwr.supernode.start_client_internal``: ``_pull_and_store_message``
    (to learn the node's state, object store, ``get_run`` and the run of the message) and
    ``_push_messages`` (the wait). The question goes out in a daemon thread (Flower's retries
    on an unreachable SuperLink never hold up the SuperNode's main thread); the main thread
    reads the answer between the wait's sleeps and acts on it there."""

    def __init__(self, every: float = 3.0, clock=time.monotonic):
        import threading

        self.every = every
        self.clock = clock
        self.state = None
        self.store = None
        self.get_run = None
        self.run_id = None
        self.waiting = False
        self.last = 0.0
        self.asking: threading.Thread | None = None
        self.not_running: set[int] = set()  # runs the SuperLink said are not running
        self.stopped: list[int] = []  # runs whose tasks this watch finished

    def install(self, sci) -> bool:
        pull, push = getattr(sci, "_pull_and_store_message", None), getattr(sci, "_push_messages", None)
        if pull is None or push is None:
            print("[mira supernode] flwr.supernode.start_client_internal has no _pull_and_store_message/"
                  "_push_messages; a run stopped with `flwr stop` runs on to the end of its message",
                  file=sys.stderr, flush=True)
            return False
        watch = self

        def pull_and_store(*a, **kw):
            watch.state, watch.get_run = kw.get("state", watch.state), kw.get("get_run", watch.get_run)
            watch.store = kw.get("object_store", watch.store)
            run_id = pull(*a, **kw)
            if run_id is not None:
                watch.run_id = run_id
            return run_id

        def push_messages(*a, **kw):
            watch.purge_replies()  # a reply a stopped run's ClientApp stored late must not stand in for this one
            watch.waiting, watch.last = True, watch.clock()
            try:
                return push(*a, **kw)
            except _RunStopped:
                return None
            finally:
                watch.waiting = False

        sci._pull_and_store_message, sci._push_messages = pull_and_store, push_messages
        _patched_time(sci).on_sleep = self.check
        return True

    def _ask(self, run_id: int) -> None:
        from flwr.supercore.run import RunNotRunningException

        try:
            self.get_run(run_id)
        except RunNotRunningException:  # Flower's reading of the SuperLink's 403 for a run not RUNNING
            self.not_running.add(run_id)
        except Exception:  # noqa: BLE001, S110 - unreachable or another error: ask again later
            pass

    def check(self) -> None:
        """Called before each sleep of the SuperNode's main loop; raises ``_RunStopped`` to end the wait."""
        import threading

        if not self.waiting or self.run_id is None or self.get_run is None or self.state is None:
            return
        run_id = self.run_id
        if run_id in self.not_running:
            self.stop(run_id)
            raise _RunStopped(run_id)
        if (self.asking is not None and self.asking.is_alive()) or self.clock() - self.last < self.every:
            return
        self.last = self.clock()
        self.asking = threading.Thread(target=self._ask, args=(run_id,), name="mira-run-stop-watch", daemon=True)
        self.asking.start()

    def stop(self, run_id: int) -> int:
        """Finish every unfinished task of ``run_id`` as stopped, drop its replies and free its
        objects; returns how many tasks were finished."""
        from flwr.common.constant import Status, SubStatus

        tasks = self.state.get_tasks(run_ids=[run_id], statuses=[Status.PENDING, Status.STARTING, Status.RUNNING])
        n = sum(bool(self.state.finish_task(t.task_id, SubStatus.STOPPED, "the run is no longer running at the "
                                            "SuperLink")) for t in tasks)
        if run_id not in self.stopped:
            self.stopped.append(run_id)
        self.purge_replies()
        if self.store is not None and hasattr(self.store, "delete_objects_in_run"):
            self.store.delete_objects_in_run(run_id)
        print(f"[mira supernode] run {run_id} is no longer running at the SuperLink (stopped, or finished without "
              f"this node's reply): {n} ClientApp task(s) marked stopped; Flower stops the ClientApp at its next "
              "task heartbeat", file=sys.stderr, flush=True)
        return n

    def purge_replies(self) -> int:
        """Delete the replies of runs this watch stopped that are still in the node's state."""
        if not self.stopped or self.state is None:
            return 0
        late = self.state.get_messages_legacy(run_ids=list(self.stopped), is_reply=True)
        if late:
            self.state.delete_messages(message_ids=[m.metadata.message_id for m in late])
            if self.store is not None:
                for m in late:
                    self.store.delete(m.metadata.message_id)
        return len(late)


def watch_exit_codes(path: str) -> None:
    """Write the code of Flower's "Exit Code: N" error log line to ``path``."""
    import logging
    import re

    class Catch(logging.Handler):
        def emit(self, record):
            m = re.match(r"Exit Code: (\d+)", str(record.getMessage()))
            if m:
                try:
                    with open(path, "w") as f:
                        f.write(m.group(1))
                except OSError:
                    pass

    logging.getLogger("flwr").addHandler(Catch(logging.ERROR))


def debug_log(path: str) -> None:
    """Append Flower's INFO lines with a timestamp to ``path`` (``MIRA_FORKSERVER_DEBUG``: the
    SuperNode's side of a message's phases, next to the fork server's)."""
    import logging

    class Stamp(logging.Handler):
        def emit(self, record):
            text = str(record.getMessage()).strip()
            if not text:
                return
            try:
                with open(path, "a") as f:
                    f.write(f"{time.time():.3f} {os.getpid()} supernode {text.splitlines()[0][:120]}\n")
            except OSError:
                pass

    logging.getLogger("flwr").addHandler(Stamp(logging.INFO))


def _env_float(name: str, default: float | None, otherwise: str) -> float | None:
    """``name`` from the environment as a number; unset: ``default``; not a number: says so and ``default``."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        print(f"[mira supernode] {name}={raw!r} is not a number; {otherwise}", file=sys.stderr)
        return default


def main() -> int:
    if os.environ.get(STATUS):
        watch_exit_codes(os.environ[STATUS])
    if os.environ.get("MIRA_FORKSERVER_DEBUG"):
        debug_log(os.environ["MIRA_FORKSERVER_DEBUG"])
    cap = _env_float(POLL, None, "idle poll left at Flower's 3 s")
    every = _env_float(RUN_CHECK, 3.0, "checking every 3 s")
    sci = _sci()
    if sci is not None:
        if cap is not None and 0 < cap < 3:
            _patched_time(sci).cap = cap
        if every > 0:
            RunStopWatch(every).install(sci)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main())
