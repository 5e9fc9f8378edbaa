"""A fork server for Flower's ClientApp processes: the same ``flwr-clientapp`` per message,
without its start-up cost.

Flower 1.42's SuperExec starts ``flwr-clientapp --token ...`` for every message (one task),
and that new process spends seconds importing Python, Flower and mira before it runs the
message (3.8 s per message on the 2-CPU test machine; the training itself took 0.5 s).
A warm SuperNode (``worker``) therefore also runs

    forkserver (this module: Flower and mira's ClientApp imported once, single-threaded)

and puts a shim named ``flwr-clientapp`` first on the SuperNode's ``PATH``. When the
SuperExec starts the shim with a task's arguments, the shim hands its arguments,
environment, working directory and stdin/stdout/stderr (``SCM_RIGHTS``) to the fork server
over a Unix socket (its folder 0700; the server also checks the peer's uid), which forks a
child that runs Flower's own ``flwr_clientapp()`` main with them. The shim waits for that
child, passes SIGTERM/SIGINT on to it and exits with its exit status. So each message is
still its own Flower ClientApp process with Flower's lifecycle: its task token, heartbeats,
the ``--parent-pid`` watch of the SuperExec, ``flwr stop``, its final status and exit code (a
crashed ClientApp fails the task visibly, exactly as before). If the fork server is not
reachable, the shim runs the real ``flwr-clientapp`` (slow, but the same result). A shim killed
outright (SIGKILL: nothing to pass on) closes its connection, and the fork server then stops
that child (SIGTERM, SIGKILL after ``KILL_GRACE``).

Forked ClientApps start within milliseconds, typically while their SuperNode is still
downloading the message (Flower creates the task first), so they retry unavailable objects with
a short wait (``PULL_BACKOFF``) instead of Flower's 1-2-4-8 s. ``MIRA_FORKSERVER_DEBUG=FILE``
logs every message's phases with timestamps.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import sys
import time

ENV = "MIRA_FORKSERVER"  # the socket, in the SuperNode's environment
REAL = "MIRA_REAL_FLWR_CLIENTAPP"  # the real flwr-clientapp, for the shim's fallback
# A file to append timestamped phases of every message to (shim, fork server, forked child):
# ``<unix time> <pid> <who> <phase> [details]``. Unset: no logging.
DEBUG = "MIRA_FORKSERVER_DEBUG"


def debug_event(who: str, phase: str, detail: str = "") -> None:
    path = os.environ.get(DEBUG)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{time.time():.3f} {os.getpid()} {who} {phase} {detail}".rstrip().encode() + b"\n")
        finally:
            os.close(fd)
    except OSError:
        pass

SHIM = '''#!{python} -S
# mira's flwr-clientapp shim (mira.federated.flower.forkserver): fork the ClientApp from a warm process
import json, os, signal, socket, struct, sys, time
DEBUG = os.environ.get("{debug}")
def debug(phase, detail=""):
    if DEBUG:
        try:
            with open(DEBUG, "a") as log:
                log.write(("%.3f %d shim %s %s" % (time.time(), os.getpid(), phase, detail)).rstrip() + "\\n")
        except OSError:
            pass
debug("start")
def fallback(why):
    sys.stderr.write("[mira forkserver] %s; starting the real flwr-clientapp\\n" % why)
    sys.stderr.flush()
    real = os.environ.get("{real}") or "flwr-clientapp"
    os.execv(real, [real] + sys.argv[1:])
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.environ["{env}"])
    req = json.dumps({{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
    socket.send_fds(s, [struct.pack("!I", len(req)) + req], [0, 1, 2])
    f = s.makefile("rb")
    pid = int(f.readline())
    debug("forked", "child %d" % pid)
except (OSError, KeyError, ValueError) as e:
    fallback("fork server not reachable (%s)" % e)
def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except OSError:
        pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
line = f.readline()
status = int(line) if line.strip() else 1
debug("exit", "status %d" % status)
if status < 0:  # the ClientApp died of a signal: so does the shim
    try:
        signal.signal(-status, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), -status)
sys.exit(status)
'''


def write_shim(folder: str, real: str) -> str:
    """Write the ``flwr-clientapp`` shim into ``folder`` (put first on the SuperNode's PATH)."""
    path = os.path.join(folder, "flwr-clientapp")
    with open(path, "w") as f:
        f.write(SHIM.format(python=sys.executable, env=ENV, real=REAL, debug=DEBUG))
    os.chmod(path, stat.S_IRWXU)
    return path


# How a forked ClientApp retries pulling a message's objects that its SuperNode has not finished
# downloading yet (seconds: first wait, cap). Flower's defaults are 1 s doubling to 10 s: fine for a
# ClientApp that spends seconds importing first, but a forked one asks at once, while its SuperNode
# (which creates the task before it pulls the message's objects from the SuperLink) is still
# downloading, and then sleeps 1 + 2 + 4 s after the objects arrived.
PULL_BACKOFF = (0.05, 0.5)
PULL_BACKOFF_ENV = "MIRA_CLIENTAPP_PULL_BACKOFF"  # "FIRST,CAP" in seconds instead (``1,10``: Flower's)


def _preload() -> None:
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401
    import numpy  # noqa: F401

    import mira.federated.flower.client_app  # noqa: F401
    import mira.federated.flower.protocol  # noqa: F401
    import mira.federated.flower.worker  # noqa: F401

    _shorten_pull_backoff()
    _shorten_task_heartbeat()


def _shorten_pull_backoff() -> bool:
    """Make this process's (and its forked ClientApps') retries for unavailable objects short."""
    try:
        import flwr.supernode.runtime.run_clientapp as rc

        fn = rc.pull_and_inflate_object_from_tree
        defaults = fn.__kwdefaults__
    except (ImportError, AttributeError):
        defaults = None
    if not defaults or "initial_backoff" not in defaults or "backoff_cap" not in defaults:
        print("[mira forkserver] flwr's pull_and_inflate_object_from_tree has no initial_backoff/backoff_cap; "
              "ClientApps keep Flower's 1-10 s retry waits", file=sys.stderr, flush=True)
        return False
    first, cap = PULL_BACKOFF
    raw = os.environ.get(PULL_BACKOFF_ENV, "")
    if raw:
        try:
            first, cap = (float(x) for x in raw.split(","))
        except ValueError:
            print(f"[mira forkserver] {PULL_BACKOFF_ENV}={raw!r} is not FIRST,CAP; using {PULL_BACKOFF}",
                  file=sys.stderr, flush=True)
    defaults["initial_backoff"], defaults["backoff_cap"] = first, cap
    return True


# How often a forked ClientApp sends its task heartbeat to its SuperNode (Flower's base interval, s;
# a beat goes out every (base - 5 s call timeout) x U(0.7, 0.9)). Flower's 30 gives one every
# 17.5-22.5 s; a refused heartbeat is how Flower stops a ClientApp whose run was stopped (``flwr
# stop``, see ``supernode.RunStopWatch``), so 10 (one every 3.5-4.5 s, a small local request) stops
# the compute sooner. The SuperNode's patience for a silent task is its own (2 x 30 s), unchanged.
TASK_HEARTBEAT = 10.0
TASK_HEARTBEAT_ENV = "MIRA_CLIENTAPP_HEARTBEAT"


def _shorten_task_heartbeat() -> bool:
    try:
        import flwr.supercore.heartbeat as hb
    except ImportError:
        return False
    if not isinstance(getattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
        print("[mira forkserver] flwr.supercore.heartbeat has no HEARTBEAT_DEFAULT_INTERVAL; ClientApps keep "
              "Flower's task heartbeat", file=sys.stderr, flush=True)
        return False
    every = TASK_HEARTBEAT
    raw = os.environ.get(TASK_HEARTBEAT_ENV, "")
    if raw:
        try:
            every = float(raw)
        except ValueError:
            print(f"[mira forkserver] {TASK_HEARTBEAT_ENV}={raw!r} is not a number; using {TASK_HEARTBEAT}",
                  file=sys.stderr, flush=True)
    floor = float(getattr(hb, "HEARTBEAT_CALL_TIMEOUT", 5)) + 1.0
    hb.HEARTBEAT_DEFAULT_INTERVAL = min(max(every, floor), float(hb.HEARTBEAT_DEFAULT_INTERVAL))
    return True


def _instrument() -> None:
    """With ``MIRA_FORKSERVER_DEBUG``: log the phases of Flower's ``run_clientapp`` in this child."""
    import flwr.supernode.runtime.run_clientapp as rc

    unavailable = [0]

    def timed(name, fn):
        def wrapper(*a, **kw):
            debug_event("child", f"{name}-begin")
            try:
                return fn(*a, **kw)
            finally:
                debug_event("child", f"{name}-end", f"unavailable={unavailable[0]}" if name == "pull_task_input" else "")
        return wrapper

    make_pull = rc.make_pull_object_fn_protobuf

    def counting_make_pull(*a, **kw):
        pull = make_pull(*a, **kw)

        def pull_counted(object_id):
            try:
                return pull(object_id)
            except Exception as e:
                if type(e).__name__ == "ObjectUnavailableError":
                    unavailable[0] += 1
                    debug_event("child", "object-unavailable", object_id[:12])
                raise
        return pull_counted

    rc.make_pull_object_fn_protobuf = counting_make_pull
    for name in ("pull_task_input", "push_message", "push_task_output", "install_from_fab", "get_load_client_app_fn"):
        if hasattr(rc, name):
            setattr(rc, name, timed(name, getattr(rc, name)))


def _child(close: list, req: dict, fds: list[int], main) -> None:
    """In the forked child: become the shim's flwr-clientapp and run Flower's main."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for obj in close:  # the fork server's sockets and pipe: the listener, every shim's connection
            try:
                obj.close() if hasattr(obj, "close") else os.close(obj)
            except OSError:
                pass
        for i, fd in enumerate(fds[:3]):
            os.dup2(fd, i)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = list(req["argv"])
        if main is None:
            from flwr.supernode.cli.flwr_clientapp import flwr_clientapp as main
        if os.environ.get(DEBUG):
            debug_event("child", "start")
            _instrument()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        debug_event("child", "main-returned", f"code {code}")
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception, then exit 1
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            debug_event("child", "os._exit", f"code {code}")
            os._exit(code)  # no atexit handlers, no joins of threads copied from the fork server


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    if struct.unpack("3i", creds)[1] != os.getuid():
        raise PermissionError("a process of another user")
    conn.settimeout(10)
    data, fds, _flags, _ = socket.recv_fds(conn, 1 << 20, 3)
    try:
        if len(data) < 4:
            raise ValueError("no request")
        n = struct.unpack("!I", data[:4])[0]
        while len(data) < 4 + n:
            more = conn.recv(1 << 20)
            if not more:
                raise ConnectionError("the shim went away")
            data += more
        req = json.loads(data[4:4 + n])
        if len(fds) != 3:
            raise ValueError(f"{len(fds)} file descriptors, expected 3")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return req, fds


# After the shim went away (killed, so it could not pass a signal on), its ClientApp gets SIGTERM
# (Flower's handlers push the final status) and SIGKILL this much later if it is still running.
KILL_GRACE = 5.0


def serve(address: str, main=None, preload: bool = True) -> None:
    """Listen on ``address`` and fork a ClientApp per request (until SIGTERM).

    ``main``: what the child runs (default Flower's ``flwr_clientapp``; tests pass their own),
    ``preload``: import Flower and mira first."""
    import select

    if preload:
        _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    os.chmod(address, 0o600)
    listener.listen(16)
    running: dict[int, socket.socket] = {}  # child pid -> the shim's connection
    orphans: dict[int, float] = {}  # child pid -> when to SIGKILL it (its shim went away)
    stop = []
    # SIGCHLD and SIGTERM wake the select through a pipe: no polling while idle.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    print(f"[mira forkserver] ready on {address} (pid {os.getpid()})", file=sys.stderr, flush=True)
    while not stop:
        by_conn = {c: pid for pid, c in running.items()}
        timeout = max(0.0, min(orphans.values()) - time.monotonic()) if orphans else None
        try:
            ready, _, _ = select.select([listener, wake_r, *by_conn], [], [], timeout)
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        for conn in ready:
            if conn in by_conn:  # a shim sends nothing after its request: this is EOF, the shim is gone
                pid = by_conn[conn]
                running.pop(pid, None)
                conn.close()
                debug_event("server", "shim-gone", f"child {pid}")
                try:
                    os.kill(pid, signal.SIGTERM)
                    orphans[pid] = time.monotonic() + KILL_GRACE
                except OSError:
                    pass
        if listener in ready:
            conn, _ = listener.accept()
            try:
                req, fds = _receive(conn)
            except (OSError, ValueError) as e:
                print(f"[mira forkserver] request refused: {e}", file=sys.stderr, flush=True)
                conn.close()
                continue
            debug_event("server", "fork")
            pid = os.fork()
            if pid == 0:
                _child([listener, conn, wake_r, wake_w, *running.values()], req, fds, main)
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(f"{pid}\n".encode())
            except OSError:
                pass
            running[pid] = conn
        now = time.monotonic()
        for pid, deadline in list(orphans.items()):
            if deadline <= now:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
                orphans[pid] = now + 3600  # reaped below once it is gone
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            orphans.pop(pid, None)
            conn = running.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            debug_event("server", "reaped", f"child {pid} code {code}")
            if conn is not None:
                try:
                    conn.sendall(f"{code}\n".encode())
                except OSError:
                    pass
                conn.close()
    for pid in list(running) + list(orphans):  # stopping: the node is going away, and so do its ClientApps
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    listener.close()
    try:
        os.unlink(address)
    except OSError:
        pass


if __name__ == "__main__":
    serve(sys.argv[1])
