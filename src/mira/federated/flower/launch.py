"""Start a whole federation on one machine: a SuperLink, N SuperNodes and the run, each a
real Flower process on loopback. Used by ``mira flower local``, the tests and the
benchmark; a real deployment starts the same commands on separate machines (see
``docs/flower.md``).

Every process started here carries ``MIRA_FLOWER_TAG=<uuid>`` in its environment, and
so do the processes Flower starts in turn (SuperExec, ServerApp, ClientApps), even
those it detaches. ``close()`` stops them all by that tag (SIGTERM, then SIGKILL) and
reports any that survived, so nothing outlives a test.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from mira.errors import MiraError
from mira.federated.flower import bundle
from mira.federated.flower.settings import RunSettings

TAG = "MIRA_FLOWER_TAG"


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and that this process has not handed out before: a port is bound only
    once the process it is given to has started, so two slow starters (a warm SuperNode and the next one)
    could otherwise get the same port, and the later one would fail on every restart."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.add(port)
    return port


def _proc_environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``MIRA_FLOWER_TAG=tag`` (Linux /proc)."""
    needle = f"{TAG}={tag}".encode()
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and int(entry) != os.getpid():
            pid = int(entry)
            if needle in _proc_environ(pid).split(b"\0") and _alive(pid):
                out.append(pid)
    return out


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    offset: int = 0  # where this start's output begins in ``log`` (a restart appends to it)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self, since_start: bool = False) -> str:
        """The log (with ``since_start``: only what this start of the process wrote)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset if since_start else 0)
                return f.read().decode(errors="replace")
        except OSError:
            return ""


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, stopped by ``close()`` (or ``with``)."""

    workdir: Path
    tls: bool = False
    auth: bool = False
    host: str = "127.0.0.1"
    env: dict = field(default_factory=dict)
    procs: dict = field(default_factory=dict)
    # The test CA, the SuperLink's key and the node keys: a folder of their own, never the
    # run directory or ``workdir`` (which ``mira flower local`` puts inside it). Default: a
    # fresh owner-only temporary folder, removed by ``close()``.
    keys_dir: Path | None = None

    def __post_init__(self):
        if self.auth and not self.tls:
            raise MiraError("SuperNode authentication needs TLS (Flower refuses it on plain text)", where="--auth")
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.port = free_port(self.host)
        self._own_keys = self.keys_dir is None
        if self._own_keys:
            import tempfile

            self.certs = Path(tempfile.mkdtemp(prefix=f"mira-flower-keys-{self.tag[:12]}-"))  # 0700
        else:
            self.certs = Path(self.keys_dir).resolve()
            if self.certs == self.workdir or self.workdir in self.certs.parents:
                raise MiraError(f"keep the keys ({self.certs}) out of the federation's workdir {self.workdir}",
                                where="keys_dir")
        self.cli_home = self.workdir / "flwr_cli"
        self.base_env = {**os.environ, **bundle.QUIET_ENV, TAG: self.tag, "PYTHONUNBUFFERED": "1",
                         **bundle.POLL_ENV, **self.env}
        self.base_env.setdefault("MIRA_THREADS", "1")
        self._serverapp_seen = False
        self.registered: dict[int, int] = {}  # node index -> Flower node id (with auth)
        if self.tls:
            from mira.federated.flower.certs import generate_ca_and_server

            generate_ca_and_server(self.certs, [self.host, "localhost"])
        bundle.write_cli_home(self.cli_home, self.address)

    # -- processes ----------------------------------------------------------------------
    @property
    def address(self) -> bundle.SuperLinkAddress:
        return bundle.SuperLinkAddress(f"{self.host}:{self.port}", str(self.certs / "ca.crt") if self.tls else None,
                                       insecure=not self.tls)

    def _start(self, name: str, cmd: list[str], home: Path) -> Proc:
        if name in self.procs and self.procs[name].alive():
            raise MiraError(f"{name} is already running")
        home.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            offset = fh.tell()
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**self.base_env, "FLWR_HOME": str(home)}, start_new_session=True)
        proc = self.procs[name] = Proc(name, popen, log, offset)
        return proc

    def start_superlink(self, timeout: float = 120) -> Proc:
        cmd = [bundle.flower_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.crt"),
                    "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        proc = self._start("superlink", cmd, self.workdir / "flwr_superlink")
        t0 = time.monotonic()
        # ready: uvicorn logged "startup complete" (it does so before it binds) and the port accepts
        while not ("Application startup complete" in proc.text(since_start=True) and self._accepts()):
            if not proc.alive():
                raise MiraError(f"the SuperLink exited: {proc.text(since_start=True)[-800:]}")
            if time.monotonic() - t0 > timeout:
                raise MiraError(f"the SuperLink did not start (and open {self.host}:{self.port}) within {timeout:.0f}s")
            time.sleep(0.1)
        return proc

    def _accepts(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=1.0).close()
            return True
        except OSError:
            return False

    def node_key(self, i: int, registered: bool = True) -> Path:
        """Node ``i``'s private key (created on first use); registered with the SuperLink if asked."""
        from mira.federated.flower.certs import generate_node_key

        name = f"supernode_{i}"
        key = self.certs / name
        if not key.exists():
            generate_node_key(self.certs, name)
        if registered and i not in self.registered:
            self.registered[i] = bundle.register_node(self.cli_home, f"{key}.pub", env={TAG: self.tag})
        return key

    def start_supernode(self, i: int, num_partitions: int, data_path: str | None = None,
                        key: Path | None = None, name: str | None = None, warm: bool = False,
                        supervised: bool = True, max_restarts: int | None = None) -> Proc:
        """SuperNode for client ``i``; ``warm``: behind a worker that keeps the model loaded;
        ``supervised`` (default; always with ``warm``): restarted with back-off when it exits
        (``worker.supervise``), as ``mira flower supernode`` does."""
        name = name or f"supernode_{i}"
        if self.auth and key is None:
            key = self.node_key(i)
        node_config = f"partition-id={i} num-partitions={num_partitions}"
        if data_path:
            node_config += f' data-path="{data_path}"'
        cmd = [bundle.flower_bin("flower-supernode"), "--superlink", f"{self.host}:{self.port}",
               "--port", str(free_port(self.host)), "--node-config", node_config]
        cmd += ["--root-certificates", str(self.certs / "ca.crt")] if self.tls else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if warm or supervised:
            opts = [] if warm else ["--cold"]
            if max_restarts is not None:
                opts += ["--max-restarts", str(max_restarts)]
            cmd = [sys.executable, "-m", "mira.federated.flower.worker", *opts, "--", *cmd]
        return self._start(name, cmd, self.workdir / f"flwr_{name}")

    def start_supernodes(self, n: int, warm: bool | list[bool] = False) -> list[Proc]:
        """SuperNodes for clients 0..n-1 (keys created and registered in parallel with auth);
        ``warm`` may be a list, one flag per node."""
        flags = warm if isinstance(warm, list) else [warm] * n
        if self.auth:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(n) as pool:
                list(pool.map(self.node_key, range(n)))
        return [self.start_supernode(i, n, warm=flags[i]) for i in range(n)]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process we started and everything in its process group (e.g. a SuperNode,
        its SuperExec and the ClientApp it is running)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.popen.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to a process we started and its process group, without waiting (e.g. SIGSTOP
        to stall a SuperNode with its worker, SIGCONT to let it go on)."""
        try:
            os.killpg(self.procs[name].popen.pid, sig)
        except ProcessLookupError:
            pass

    def crash_superlink(self) -> None:
        """SIGKILL the SuperLink and everything it started (SuperExec, ServerApp), as when its
        machine goes down; the SuperNodes stay. ``start_superlink()`` starts it again (same port)."""
        self.kill("superlink", signal.SIGKILL)
        nodes = {p.popen.pid for n, p in self.procs.items() if n != "superlink"}
        deadline = time.monotonic() + 10.0
        while True:
            rest = []
            for pid in tagged_pids(self.tag):
                try:
                    if os.getpgid(pid) not in nodes:
                        os.kill(pid, signal.SIGKILL)
                        rest.append(pid)
                except ProcessLookupError:
                    pass
            if not rest:
                return
            if time.monotonic() > deadline:
                raise MiraError(f"SuperLink-side processes survived SIGKILL: {rest}")
            time.sleep(0.1)

    def group_pids(self, name: str) -> list[int]:
        """Live tagged processes in ``name``'s process group (e.g. its running ClientApp)."""
        pgid = self.procs[name].popen.pid
        out = []
        for pid in tagged_pids(self.tag):
            try:
                if os.getpgid(pid) == pgid:
                    out.append(pid)
            except ProcessLookupError:
                pass
        return out

    def clientapp_running(self, name: str) -> bool:
        return any("flwr-clientapp" in _cmdline(p) for p in self.group_pids(name))

    def serverapp_done(self) -> bool:
        """True once a ServerApp process has been seen and is gone (cheap; no ``flwr`` call)."""
        running = any("flwr-serverapp" in _cmdline(p) for p in tagged_pids(self.tag))
        self._serverapp_seen |= running
        return self._serverapp_seen and not running

    # -- runs ---------------------------------------------------------------------------
    def submit(self, yaml_text: str, settings: RunSettings) -> str:
        app = bundle.write_app(self.workdir / f"app_{uuid.uuid4().hex[:8]}", yaml_text, settings)
        self._serverapp_seen = False
        return bundle.submit(self.cli_home, app, env={TAG: self.tag})

    def wait(self, run_id: str, timeout: float = 1800) -> dict:
        link = self.procs.get("superlink")
        return bundle.wait_run(self.cli_home, run_id, timeout=timeout, poll=30.0, env={TAG: self.tag},
                               maybe_done=self.serverapp_done, alive=(link.alive if link else None))

    def stop(self, run_id: str) -> None:
        bundle.stop_run(self.cli_home, run_id, env={TAG: self.tag})

    def logs(self, run_id: str) -> str:
        return bundle.run_logs(self.cli_home, run_id, env={TAG: self.tag})

    # -- teardown ---------------------------------------------------------------------------
    def close(self, grace: float = 5.0) -> list[str]:
        """Stop every process of this federation (SuperNodes first, so they can still say
        goodbye to the SuperLink); returns descriptions of any still alive."""
        order = sorted(self.procs.values(), key=lambda p: p.name == "superlink")
        for proc in order:
            if proc.alive():
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                if proc.name == "superlink":
                    break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.alive() for p in order if p.name != "superlink"):
            time.sleep(0.1)
        for pid in tagged_pids(self.tag):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        link = self.procs.get("superlink")
        if link is not None and link.alive():
            os.killpg(link.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and (tagged_pids(self.tag) or any(p.alive() for p in order)):
            time.sleep(0.1)
        for proc in order:
            if proc.alive():
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid in tagged_pids(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in order:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and tagged_pids(self.tag):
            time.sleep(0.1)
        import glob
        import shutil
        import tempfile

        for d in glob.glob(os.path.join(tempfile.gettempdir(), f"mira-worker-{self.tag[:12]}-*")):
            shutil.rmtree(d, ignore_errors=True)  # sockets of workers that were killed
        if self._own_keys:
            shutil.rmtree(self.certs, ignore_errors=True)  # a throw-away test CA: no key outlives the federation
        return self.leftovers()

    def leftovers(self) -> list[str]:
        left = [f"{p} {_cmdline(p)[:120]}" for p in tagged_pids(self.tag)]
        left += [f"{p.popen.pid} {p.name}" for p in self.procs.values() if p.alive()]
        return left

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
