"""Submitting a run: the Flower App that ``flwr run`` bundles (a FAB), and the ``flwr``
CLI calls around it (register a SuperNode key, start a run, wait for it, fetch logs).

The app is one ``pyproject.toml``: its components point at mira's ServerApp and
ClientApp (mira must be installed on the SuperLink and on every SuperNode), and its
run config carries the run's mira YAML as text plus the ``RunSettings``. Flower ships
the bundle to every node, so the nodes need no copy of the config.

The ``flwr`` CLI reads its SuperLink connections from ``$FLWR_HOME/config.toml``; mira
writes its own small home (one connection named ``mira``) instead of touching
``~/.flwr``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mira.errors import MiraError
from mira.federated.flower.settings import RunSettings

CONNECTION = "mira"
APP_NAME = "mira-federation"
# Merged into the environment of every Flower process we start. PATH gets this Python's bin
# folder first: flower-superlink starts `flower-superexec` by name, which must be found even
# when the virtual environment is not activated (e.g. under `make test`).
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
             "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
# Poll settings, the same for ``mira flower superlink``/``supernode`` and ``mira flower local``: a
# SuperExec (the SuperNode's, which starts ClientApps, and the SuperLink's, which starts the
# ServerApp) asks for new work every 0.3 s (Flower's default: 1 s).
# The SuperNode's own idle poll (Flower: a fixed 3 s) is capped by mira's entry point
# (``mira.federated.flower.supernode``, which the supervisor runs) at MIRA_SUPERNODE_POLL seconds.
POLL_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.3", "MIRA_SUPERNODE_POLL": "0.3"}


def flower_bin(name: str) -> str:
    """A Flower executable (``flwr``, ``flower-superlink``, ...) next to this Python, else on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise MiraError(f"{name} not found; install flwr (pip install 'flwr>=1.42,<1.43', the tested version)")
    return found


def config_text(raw: dict) -> str:
    """The run's YAML as it travels (overrides applied; ``${VARS}`` expanded on each machine)."""
    return yaml.safe_dump(raw, sort_keys=False)


def write_app(app_dir: str | os.PathLike, yaml_text: str, settings: RunSettings) -> Path:
    """Write the Flower App (``pyproject.toml``) that ``flwr run`` turns into a FAB."""
    import tomli_w

    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": "1.0.0",
                    "description": "A mira federated LoRA run (components come from the installed mira package)",
                    "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "mira",
            "components": {"serverapp": "mira.federated.flower.server_app:app",
                           "clientapp": "mira.federated.flower.client_app:app"},
            "config": {"mira-config": yaml_text, **settings.to_run_config()},
        }}},
    }
    (app_dir / "pyproject.toml").write_bytes(tomli_w.dumps(doc, multiline_strings=True).encode())
    return app_dir


@dataclass
class SuperLinkAddress:
    """How the ``flwr`` CLI reaches the SuperLink (the same port serves Fleet, Control and Runtime APIs)."""

    address: str  # host:port
    root_cert: str | None = None  # CA certificate (TLS); None with insecure
    insecure: bool = False

    def check(self) -> "SuperLinkAddress":
        if self.insecure and self.root_cert:
            raise MiraError("give either --root-cert (TLS) or --insecure, not both", where="--insecure")
        if not self.insecure and not self.root_cert:
            raise MiraError("the SuperLink uses TLS by default: pass --root-cert ca.crt (or --insecure for a "
                            "plain-text test federation)", where="--root-cert")
        if self.root_cert and not Path(self.root_cert).is_file():
            raise MiraError(f"not found: {self.root_cert}", where="--root-cert")
        return self


def write_cli_home(home: str | os.PathLike, link: SuperLinkAddress) -> Path:
    import tomli_w

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    conn: dict = {"address": link.address}
    if link.insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(link.root_cert).resolve())
    doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    (home / "config.toml").write_bytes(tomli_w.dumps(doc).encode())
    return home


def flwr(home: str | os.PathLike, *args: str, timeout: float = 120, check: bool = True,
         env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with ``FLWR_HOME=home``."""
    full_env = {**os.environ, **QUIET_ENV, **(env or {}), "FLWR_HOME": str(home)}
    try:
        proc = subprocess.run([flower_bin("flwr"), *args], env=full_env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise MiraError(f"flwr {' '.join(args[:2])} did not finish in {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise MiraError(f"flwr {' '.join(args[:2])} failed (exit {proc.returncode}): " + " | ".join(tail))
    return proc


def _json(proc: subprocess.CompletedProcess) -> dict:
    text = proc.stdout
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        raise MiraError(f"unexpected output from flwr: {text.strip()[:200]}") from None


def register_node(home: str | os.PathLike, public_key: str | os.PathLike, env: dict | None = None) -> int:
    """Register a SuperNode's public key with the SuperLink (needed with --enable-supernode-auth)."""
    out = _json(flwr(home, "supernode", "register", str(public_key), CONNECTION, "--format", "json", env=env))
    if not out.get("success"):
        raise MiraError(f"could not register {public_key}: {out}")
    return int(out["node-id"])


def submit(home: str | os.PathLike, app_dir: str | os.PathLike, env: dict | None = None) -> str:
    """``flwr run`` the app; returns the run id."""
    out = _json(flwr(home, "run", str(app_dir), CONNECTION, "--format", "json", env=env))
    if not out.get("success") or not out.get("run-id"):
        raise MiraError(f"flwr run failed: {out}")
    return str(out["run-id"])


def run_info(home: str | os.PathLike, run_id: str, env: dict | None = None) -> dict:
    out = _json(flwr(home, "ls", "--run-id", run_id, CONNECTION, "--format", "json", env=env))
    runs = out.get("runs") or []
    return runs[0] if runs else {}


def wait_run(home: str | os.PathLike, run_id: str, timeout: float = 3600, poll: float = 5.0,
             env: dict | None = None, maybe_done=None, alive=None) -> dict:
    """Poll until the run's status is ``finished:*``; returns its ``flwr ls`` entry.

    Every ``flwr ls`` is a new process, so when the caller can tell cheaply that the run
    has probably ended (``maybe_done()``), the CLI is asked only then (and every ``poll``
    seconds otherwise)."""
    t0 = last = time.monotonic()
    while True:
        now = time.monotonic()
        if now - last >= poll or (maybe_done is not None and maybe_done()):
            last = now
            info = run_info(home, run_id, env)
            if str(info.get("status", "")).startswith("finished"):
                return info
        if alive is not None and not alive():
            raise MiraError("the SuperLink stopped before the run finished")
        if now - t0 > timeout:
            raise MiraError(f"run {run_id} did not finish within {timeout:.0f}s")
        time.sleep(0.5 if maybe_done is not None else min(poll, 1.0))


def stop_run(home: str | os.PathLike, run_id: str, env: dict | None = None) -> None:
    """``flwr stop`` the run."""
    out = _json(flwr(home, "stop", run_id, CONNECTION, "--format", "json", env=env))
    if out and not out.get("success", True):
        raise MiraError(f"flwr stop {run_id} failed: {out}")


def run_logs(home: str | os.PathLike, run_id: str, env: dict | None = None) -> str:
    proc = flwr(home, "log", run_id, CONNECTION, "--show", check=False, env=env)
    return proc.stdout + proc.stderr
