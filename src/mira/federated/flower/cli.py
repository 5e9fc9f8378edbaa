"""``mira flower ...``: run a federation on Flower (SuperLink, SuperNodes, ``flwr run``).

* ``mira flower certs``      a test CA, the SuperLink's TLS certificate, SuperNode keys
* ``mira flower superlink``  start a SuperLink (TLS by default; ``--auth``: only registered nodes)
* ``mira flower register``   register a SuperNode's public key with the SuperLink
* ``mira flower supernode``  start a SuperNode for one client (``--warm``: keep the model loaded)
* ``mira flower run``        submit a run with a ``mira run`` YAML config and wait for it
* ``mira flower app``        write the Flower App only (for ``flwr run`` with your own Flower config)
* ``mira flower local``      all of the above on 127.0.0.1, in one command

The first four are thin wrappers over ``flower-superlink``, ``flower-supernode`` and the
``flwr`` CLI; ``--dry-run`` prints the Flower command instead of running it.
"""
from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from mira.errors import MiraError
from mira.federated.flower.settings import ROUND_TIMEOUT, STRAGGLER_TIMEOUT
from mira.federated.flower.worker import BACKOFF_BASE, BACKOFF_MAX, MAX_RESTARTS

console = Console()
flower_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                         help="Federations across machines on Flower: SuperLink, SuperNodes, runs, TLS and node auth.")


def _exec(cmd: list[str], dry_run: bool, env: dict | None = None) -> None:
    from mira.federated.flower.bundle import QUIET_ENV

    console.print("$ " + shlex.join(cmd), highlight=False, soft_wrap=True)
    if dry_run:
        return
    os.execve(cmd[0], cmd, {**os.environ, **QUIET_ENV, **(env or {})})


def _tls_args(certs: Optional[Path], root_cert: Optional[Path], insecure: bool) -> tuple[Optional[Path], bool]:
    """The CA certificate a client trusts: --root-cert, or certs/ca.crt; or --insecure."""
    if insecure and (certs or root_cert):
        raise MiraError("give either --insecure or certificates, not both", where="--insecure")
    ca = root_cert or (certs / "ca.crt" if certs else None)
    if not insecure and ca is None:
        raise MiraError("TLS needs the CA certificate: --root-cert ca.crt or --certs DIR (or --insecure for a "
                        "plain-text test federation)", where="--root-cert")
    if ca is not None and not ca.is_file():
        raise MiraError(f"not found: {ca}", where="--root-cert")
    return ca, insecure


@flower_app.command("certs")
def certs_cmd(out: Path = typer.Option(Path("certs"), "--out", "-o", help="folder to write into"),
              nodes: int = typer.Option(3, "--nodes", "-n", help="SuperNode key pairs to create"),
              host: List[str] = typer.Option([], "--host", help="SuperLink host name or IP for the certificate "
                                                                 "(repeatable; default localhost, 127.0.0.1, ::1)"),
              overwrite: bool = typer.Option(False, "--overwrite")):
    """Create a test CA, the SuperLink's TLS certificate and SuperNode auth keys (for testing)."""
    from mira.federated.flower.certs import DEFAULT_HOSTS, generate_all

    files = generate_all(out, nodes, host or list(DEFAULT_HOSTS), overwrite=overwrite)
    console.print(f"CA: {files['ca']}\nSuperLink: {files['server_cert']}, {files['server_key']}")
    for priv, pub in files["nodes"]:
        console.print(f"SuperNode key: {priv} (public: {pub})")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    import ipaddress

    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(host: str, tls: bool, auth: bool, insecure: bool) -> None:
    """A SuperLink reachable from other machines must use TLS and node authentication; only
    ``--insecure`` (said explicitly) lets it listen there without them."""
    if is_loopback(host):
        return
    if insecure:
        console.print(f"[red]warning:[/] the SuperLink listens on {host} in plain text and accepts any SuperNode "
                      "(--insecure): anyone who can reach the port can read the adapters and join the federation")
        return
    missing = [what for what, ok in (("TLS (--certs)", tls), ("node authentication (--auth)", auth)) if not ok]
    if missing:
        raise MiraError(f"--host {host} is reachable from other machines; that needs {' and '.join(missing)}. "
                        "Use --host 127.0.0.1 for a local federation, or pass --insecure to listen there without "
                        "TLS and node authentication (tests only)", where="--host")


@flower_app.command("superlink")
def superlink_cmd(certs: Optional[Path] = typer.Option(None, "--certs", help="folder with ca.crt, server.crt, "
                                                                              "server.key (mira flower certs)"),
                  insecure: bool = typer.Option(False, "--insecure", help="plain text, no TLS, no node auth (tests "
                                                "only; needed to listen on a non-loopback address without both)"),
                  auth: bool = typer.Option(False, "--auth", help="accept only SuperNodes registered with "
                                                                  "`mira flower register` (needs TLS)"),
                  host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (default loopback "
                                           "only; any other needs --certs and --auth, or an explicit --insecure)"),
                  port: int = typer.Option(9093, "--port", help="one port for the Fleet, Control and Runtime APIs"),
                  database: Optional[str] = typer.Option(None, "--database", help="SQLite file for the SuperLink "
                                                                                  "state (default: in memory)"),
                  dry_run: bool = typer.Option(False, "--dry-run", help="print the command only")):
    """Start a Flower SuperLink (runs mira's ServerApp when a run is submitted)."""
    from mira.federated.flower.bundle import flower_bin

    check_exposure(host, tls=not insecure and certs is not None, auth=auth, insecure=insecure)
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if insecure:
        if certs or auth:
            raise MiraError("--insecure cannot be combined with --certs or --auth (node auth needs TLS)",
                            where="--insecure")
        cmd.append("--insecure")
    else:
        if certs is None:
            raise MiraError("TLS needs --certs DIR (from `mira flower certs`), or --insecure", where="--certs")
        for f in ("ca.crt", "server.crt", "server.key"):
            if not (certs / f).is_file():
                raise MiraError(f"{certs / f} not found", where="--certs")
        cmd += ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"),
                "--ssl-keyfile", str(certs / "server.key")]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database:
        cmd += ["--database", database]
    from mira.federated.flower.bundle import POLL_ENV

    _exec(cmd, dry_run, {"MIRA_THREADS": os.environ.get("MIRA_THREADS", "1"), **POLL_ENV})


@flower_app.command("supernode")
def supernode_cmd(partition_id: int = typer.Option(..., "--partition-id", help="this node's client id"),
                  num_partitions: int = typer.Option(..., "--num-partitions", help="number of clients"),
                  superlink: str = typer.Option("127.0.0.1:9093", "--superlink", help="SuperLink host:port"),
                  data_path: Optional[str] = typer.Option(None, "--data-path", help="this node's own records "
                                                          "(default: its partition of the run's data section)"),
                  certs: Optional[Path] = typer.Option(None, "--certs", help="folder with ca.crt"),
                  root_cert: Optional[Path] = typer.Option(None, "--root-cert", help="CA certificate to trust"),
                  insecure: bool = typer.Option(False, "--insecure"),
                  key: Optional[Path] = typer.Option(None, "--key", help="private key for node authentication "
                                                                         "(e.g. certs/supernode_0)"),
                  port: int = typer.Option(9094, "--port", help="local port of the node's Runtime API (one per "
                                                                "SuperNode on a machine)"),
                  warm: bool = typer.Option(False, "--warm", help="keep the model loaded between messages "
                                                                  "(a worker process next to the SuperNode)"),
                  max_restarts: int = typer.Option(MAX_RESTARTS, "--max-restarts", help="restart the SuperNode "
                                                   "when it exits (e.g. after a SuperLink restart), with back-off "
                                                   f"{BACKOFF_BASE:g}s, doubling, at most {BACKOFF_MAX:g}s; give up "
                                                   f"after this many restarts in a row (0: never restart)"),
                  dry_run: bool = typer.Option(False, "--dry-run")):
    """Start a Flower SuperNode holding client PARTITION_ID's data (supervised: restarted with back-off
    when it exits, e.g. because its SuperLink restarted)."""
    from mira.federated.flower.bundle import flower_bin

    ca, insecure = _tls_args(certs, root_cert, insecure)
    if key is not None and insecure:
        raise MiraError("node authentication (--key) needs TLS", where="--key")
    if key is not None and not key.is_file():
        raise MiraError(f"not found: {key}", where="--key")
    if not 0 <= partition_id < num_partitions:
        raise MiraError(f"--partition-id must be in [0, {num_partitions})", where="--partition-id")
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if data_path:
        node_config += f' data-path="{os.path.abspath(os.path.expanduser(data_path))}"'
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", node_config]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(ca)]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    if max_restarts < 0:
        raise MiraError("--max-restarts must be >= 0", where="--max-restarts")
    from mira.federated.flower.bundle import POLL_ENV, QUIET_ENV

    env = {"MIRA_THREADS": os.environ.get("MIRA_THREADS", "1"), **POLL_ENV}
    opts = ([] if warm else ["--cold"]) + ["--max-restarts", str(max_restarts)]
    console.print("$ " + " ".join(f"{k}={v}" for k, v in POLL_ENV.items()) + " "
                  + shlex.join([sys.executable, "-m", "mira.federated.flower.worker", *opts, "--", *cmd]),
                  highlight=False, soft_wrap=True)
    if dry_run:
        return
    from mira.federated.flower.node import TransportWatch, check_superlink_transport

    # Flower's SuperNode retries a transport mismatch (--insecure vs TLS) forever, silently: probe first,
    # and, while the SuperLink does not answer yet, go on probing it (the supervisor stops the node on a mismatch)
    seen = check_superlink_transport(superlink, insecure, str(ca) if ca else None,
                                     log=lambda m: console.print(f"note: {m}", highlight=False))
    watch = TransportWatch(superlink, insecure, str(ca) if ca else None) if seen.startswith("unreachable") else None
    from mira.federated.flower.worker import run

    os.environ.update({**QUIET_ENV, **env})
    sys.stdout.flush()  # our lines before the SuperNode's (it writes to the same stdout)
    raise typer.Exit(run(cmd, warm=warm, max_restarts=max_restarts, watch=watch))


@flower_app.command("register")
def register_cmd(public_key: Path = typer.Argument(..., help="the SuperNode's public key (e.g. certs/supernode_0.pub)"),
                 superlink: str = typer.Option("127.0.0.1:9093", "--superlink"),
                 certs: Optional[Path] = typer.Option(None, "--certs"),
                 root_cert: Optional[Path] = typer.Option(None, "--root-cert")):
    """Register a SuperNode's public key with a SuperLink started with --auth."""
    from mira.federated.flower import bundle

    ca, _ = _tls_args(certs, root_cert, False)
    if not public_key.is_file():
        raise MiraError(f"not found: {public_key}")
    with tempfile.TemporaryDirectory(prefix="mira-flwr-") as home:
        bundle.write_cli_home(home, bundle.SuperLinkAddress(superlink, str(ca)).check())
        node_id = bundle.register_node(home, public_key)
    console.print(f"registered {public_key} as node {node_id}")


def _settings(out: Path, round_timeout: float, straggler_timeout: float, node_wait: float, resume: bool,
              min_clients: int = 0, cross_eval: bool = False):
    from mira.federated.flower.settings import RunSettings

    if min_clients < 0:
        raise MiraError("--min-clients must be >= 0 (0: a strict majority of the sampled clients)",
                        where="--min-clients")
    return RunSettings(out_dir=str(out.expanduser().resolve()), round_timeout=round_timeout,
                       straggler_timeout=straggler_timeout, node_wait=node_wait, resume=resume,
                       min_clients=min_clients, cross_eval=cross_eval)


_ROUND_HELP = f"seconds a round may take (0: no limit; default {ROUND_TIMEOUT:g})"
_STRAGGLER_HELP = (f"once the quorum (--min-clients) has replied, wait this long for the rest (negative: wait for "
                   f"all, up to --round-timeout; default {STRAGGLER_TIMEOUT:g})")
_MIN_HELP = ("sampled clients that must reply for a round to count (0: a strict majority; federation.min_clients "
             "is a floor); a round or evaluation with fewer replies than sampled is flagged partial")
_CROSS_HELP = ("evaluation: send every node every client's adapter, to compute the global test loss (this shows "
               "each client's personalised adapter to every node); default: each node gets only its own")


_RESUME_HELP = ("continue the run in RUN_DIR (on the SuperLink's machine) from its last checkpoint, with its own "
                "config.yaml (or CONFIG, when RUN_DIR is not readable here); the ServerApp refuses a changed config")


def _resume_dir(resume: Optional[Path], out: Optional[Path]) -> Optional[Path]:
    """``--resume RUN_DIR``: the run directory (``--out``, if given too, must be the same)."""
    if resume is None:
        return None
    if out is not None and out.expanduser().resolve() != resume.expanduser().resolve():
        raise MiraError(f"--resume {resume} continues that run directory; --out {out} names another",
                        where="--resume")
    return resume


def _load(config: Optional[Path], set_: List[str], resume: Optional[Path], out: Optional[Path]):
    from mira.config import load_config

    if resume is not None and config is None:
        if not (resume / "config.yaml").exists():
            raise MiraError(f"{resume}/config.yaml not found: --resume RUN_DIR needs the run directory (on this "
                            "machine), or the run's CONFIG as well when RUN_DIR is on the SuperLink's machine",
                            where="--resume")
        config = resume / "config.yaml"
    cfg, raw = load_config(config, set_)
    from mira.federated.flower.server import check_supported

    check_supported(cfg)
    return cfg, raw


def _print_summary(out: Path, info: dict) -> None:
    import json

    summary_file = out / "summary.json"
    if not summary_file.exists():
        console.print(f"run directory (on the SuperLink's machine): {out}")
        return
    s = json.loads(summary_file.read_text())
    t = Table(title=f"{s['algorithm']} on Flower after {s['rounds']} rounds")
    for col in ("mean local loss", "mean global loss", "bytes up", "bytes down", "Flower bytes (fit+eval)"):
        t.add_column(col, justify="right")
    fl = s.get("flower", {})
    flower_total = sum(int(fl.get(k, 0)) for k in ("fit_bytes_down", "fit_bytes_up", "eval_bytes_down",
                                                    "eval_bytes_up", "hello_bytes"))
    glob = s.get("mean_global_test_loss")
    t.add_row(f"{s['mean_local_test_loss']:.4f}", "not computed" if glob is None else f"{glob:.4f}",
              f"{s['bytes_up']:,}",
              f"{s['bytes_down']:,}", f"{flower_total:,}")
    console.print(t)
    traffic = info.get("network-traffic", {})
    if traffic:
        console.print(f"SuperLink Fleet traffic for the run: {traffic.get('total-bytes', 0):,} bytes")
    if fl.get("failed_updates"):
        console.print(f"left out: {fl['failed_updates']}")
    if s.get("partial_rounds") or s.get("partial_evaluations"):
        console.print(f"[yellow]partial:[/] rounds {s.get('partial_rounds', [])} ran with fewer clients than sampled; "
                      f"evaluations of rounds {s.get('partial_evaluations', [])} missed clients")
    if fl.get("rebindings"):
        console.print(f"clients re-bound to another node: {fl['rebindings']}")
    console.print(f"run directory: {out}")


@flower_app.command("run")
def run_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config, as for `mira run` (default: the "
                                                               "embedded demo config)"),
            superlink: str = typer.Option("127.0.0.1:9093", "--superlink", help="SuperLink host:port"),
            certs: Optional[Path] = typer.Option(None, "--certs", help="folder with ca.crt"),
            root_cert: Optional[Path] = typer.Option(None, "--root-cert", help="CA certificate to trust"),
            insecure: bool = typer.Option(False, "--insecure"),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory, on the SuperLink's machine "
                                                                         "(default runs/flower-<algorithm>)"),
            set_: List[str] = typer.Option([], "--set", help="override a config field, e.g. federation.rounds=5"),
            round_timeout: float = typer.Option(ROUND_TIMEOUT, "--round-timeout", help=_ROUND_HELP),
            straggler_timeout: float = typer.Option(STRAGGLER_TIMEOUT, "--straggler-timeout", help=_STRAGGLER_HELP),
            min_clients: int = typer.Option(0, "--min-clients", help=_MIN_HELP),
            cross_eval: bool = typer.Option(False, "--cross-eval", help=_CROSS_HELP),
            node_wait: float = typer.Option(600.0, "--node-wait", help="seconds to wait for every client's SuperNode"),
            resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN_DIR", help=_RESUME_HELP),
            wait: bool = typer.Option(True, "--wait/--no-wait", help="wait for the run to finish"),
            timeout: float = typer.Option(24 * 3600.0, "--timeout", help="give up waiting after this many seconds")):
    """Submit a run to a SuperLink (`flwr run` with mira's app) and wait for it."""
    from mira.federated.flower import bundle

    ca, insecure = _tls_args(certs, root_cert, insecure)
    out = _resume_dir(resume, out) or out
    cfg, raw = _load(config, set_, resume, out)
    out = out or Path("runs") / f"flower-{cfg.algorithm.name}"
    settings = _settings(out, round_timeout, straggler_timeout, node_wait, resume is not None, min_clients,
                         cross_eval)
    link = bundle.SuperLinkAddress(superlink, str(ca) if ca else None, insecure).check()
    with tempfile.TemporaryDirectory(prefix="mira-flwr-") as tmp:
        home = bundle.write_cli_home(Path(tmp) / "home", link)
        app = bundle.write_app(Path(tmp) / "app", bundle.config_text(raw), settings)
        run_id = bundle.submit(home, app)
        console.print(f"run {run_id} submitted to {superlink}; run directory {settings.out_dir}")
        if not wait:
            console.print(f"follow it with: FLWR_HOME=<home> flwr log {run_id}   (or `flwr ls`)")
            return
        info = bundle.wait_run(home, run_id, timeout=timeout)
        status = info.get("status")
        if status != "finished:completed":
            tail = "\n".join(bundle.run_logs(home, run_id).strip().splitlines()[-15:])
            console.print(tail, highlight=False, markup=False)
            raise MiraError(f"run {run_id} ended {status}: {info.get('status-details')}")
    _print_summary(Path(settings.out_dir), info)


@flower_app.command("app")
def app_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config, as for `mira run`"),
            app_dir: Path = typer.Option(..., "--app-dir", help="folder to write the Flower App into"),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory, on the SuperLink's machine"),
            set_: List[str] = typer.Option([], "--set"),
            round_timeout: float = typer.Option(ROUND_TIMEOUT, "--round-timeout", help=_ROUND_HELP),
            straggler_timeout: float = typer.Option(STRAGGLER_TIMEOUT, "--straggler-timeout", help=_STRAGGLER_HELP),
            min_clients: int = typer.Option(0, "--min-clients", help=_MIN_HELP),
            cross_eval: bool = typer.Option(False, "--cross-eval", help=_CROSS_HELP),
            node_wait: float = typer.Option(600.0, "--node-wait"),
            resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN_DIR", help=_RESUME_HELP)):
    """Write the Flower App for a config, to submit yourself with `flwr run APP_DIR <connection>`."""
    from mira.federated.flower import bundle

    out = _resume_dir(resume, out) or out
    cfg, raw = _load(config, set_, resume, out)
    out = out or Path("runs") / f"flower-{cfg.algorithm.name}"
    app = bundle.write_app(app_dir, bundle.config_text(raw),
                           _settings(out, round_timeout, straggler_timeout, node_wait, resume is not None,
                                     min_clients, cross_eval))
    console.print(f"Flower App written to {app}/pyproject.toml; submit it with: flwr run {app} <connection> --stream")


def _num_clients(cfg) -> int:
    from mira.data.partition import partition
    from mira.data.records import load_records

    return len(partition(load_records(cfg.data, seed=cfg.data.seed), cfg.partition, seed=cfg.seed, min_train=1))


@flower_app.command("local")
def local_cmd(config: Optional[Path] = typer.Argument(None, help="YAML config, as for `mira run`"),
              out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default "
                                                                           "runs/flower-<algorithm>)"),
              set_: List[str] = typer.Option([], "--set"),
              tls: bool = typer.Option(False, "--tls", help="TLS with a fresh test CA"),
              auth: bool = typer.Option(False, "--auth", help="SuperNode authentication (implies --tls)"),
              warm: bool = typer.Option(False, "--warm", help="keep each node's model loaded between messages"),
              round_timeout: float = typer.Option(ROUND_TIMEOUT, "--round-timeout", help=_ROUND_HELP),
              straggler_timeout: float = typer.Option(STRAGGLER_TIMEOUT, "--straggler-timeout", help=_STRAGGLER_HELP),
              min_clients: int = typer.Option(0, "--min-clients", help=_MIN_HELP),
              cross_eval: bool = typer.Option(False, "--cross-eval", help=_CROSS_HELP),
              workdir: Optional[Path] = typer.Option(None, "--workdir", help="logs and Flower homes (default "
                                                                             "<out>/flower; the test CA and keys go to "
                                                                             "a temporary folder of their own, removed "
                                                                             "at the end)")):
    """A whole federation on 127.0.0.1: a SuperLink, one SuperNode per client, the run; then stop them."""
    from mira.federated.flower import bundle
    from mira.federated.flower.launch import LocalFederation

    cfg, raw = _load(config, set_, None, None)
    out = (out or Path("runs") / f"flower-{cfg.algorithm.name}").expanduser().resolve()
    k = _num_clients(cfg)
    settings = _settings(out, round_timeout, straggler_timeout, 600.0, False, min_clients, cross_eval)
    fed = LocalFederation(workdir or out / "flower", tls=tls or auth, auth=auth)
    try:
        fed.start_superlink()
        console.print(f"SuperLink on {fed.address.address} ({'TLS' if fed.tls else 'insecure'}"
                      f"{', node auth' if auth else ''}); starting {k} SuperNodes")
        for i in range(k):
            fed.start_supernode(i, k, warm=warm)
        run_id = fed.submit(bundle.config_text(raw), settings)
        console.print(f"run {run_id}: logs in {fed.workdir / 'logs'}")
        info = fed.wait(run_id)
        if info.get("status") != "finished:completed":
            tail = "\n".join(fed.logs(run_id).strip().splitlines()[-15:])
            console.print(tail, highlight=False, markup=False)
            raise MiraError(f"run {run_id} ended {info.get('status')}: {info.get('status-details')}")
    finally:
        left = fed.close()
        if left:
            console.print(f"[red]processes still alive:[/] {left}")
    _print_summary(out, info)


def register(app: typer.Typer) -> None:
    app.add_typer(flower_app, name="flower")
