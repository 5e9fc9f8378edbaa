"""Flower runtime benchmark: bytes on the wire per client per round, and the per-round
time of a 3-node loopback federation against the in-process engine on the same work.

    MIRA_THREADS=1 python benchmarks/flower_bench.py [--rounds 3] [--modes cold,warm,warm-bf16]

Runs, on one machine:

* ``engine``: ``mira run``'s in-process engine (``Engine.run``) on the config below;
* ``cold``: a SuperLink and 3 SuperNodes on 127.0.0.1 (insecure), Flower's default
  ClientApp: a fresh process per message that loads the model;
* ``warm``: the same with ``--warm`` SuperNodes (a worker keeps the model loaded);
* ``warm-bf16``: warm, with ``federation.wire_dtype: bfloat16``;
* ``warm-tls``: warm, with TLS and SuperNode authentication;
* ``warm-legacy``: warm as before the fork server and the poll cap (``MIRA_FORKSERVER_OFF=1``,
  ``MIRA_SUPERNODE_POLL=3``: a fresh ``flwr-clientapp`` process per message, Flower's 3 s idle poll).

Per round it also splits the time (``breakdown``): ``client_s``, the slowest node's time in
mira's ClientApp handler for the fit message (from the node logs, 0.1 s resolution; the warm
worker's training), and ``fixed_s = round_s - client_s``, what the transport adds (SuperNode
poll, SuperExec poll, ClientApp process start, pushes and pulls); ``clientapp_s_per_msg`` is
Flower's own ClientApp compute time (``flwr ls``) per message: from the ClientApp's
``PullMessages`` to its ``PushMessages`` on the SuperNode, so neither the process start nor its
exit, but the wait for a message its SuperNode is still downloading (a forked ClientApp asks at
once; a fresh process only after seconds of imports).

Bytes come from Flower's side: what the records of every message the ServerApp pushes
and pulls hold (``protocol.payload_bytes``, Flower's public ``count_bytes()``: array data
with its numpy headers, record keys, config and metric values; without Flower's object
headers, ids and protobuf framing), and the SuperLink's
own Fleet traffic counters for the run (``flwr ls``: protobuf request+response bytes of
every Fleet call, including hello and evaluation). Prints a table and writes
``benchmarks/results/flower.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MIRA_THREADS", "1")

CFG = {
    "seed": 0,
    "model": {"path": "builtin:demo"},
    "lora": {"r": 8, "alpha": 16},
    "data": {"source": "synthetic", "tasks": ["add", "upper", "reverse_words"], "max_per_task": 40,
             "max_length": 64},
    "partition": {"name": "by_task", "test_size": 8},
    "federation": {"rounds": 3, "local_steps": 8, "batch_size": 8, "lr": 0.003},
    "algorithm": {"name": "mira", "lambda": 0.5},
    "eval": {"every": 3},
    "plots": False,
}
K = 3


def machine() -> dict:
    import flwr
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?",
            "torch_threads": int(os.environ.get("MIRA_THREADS", "0")), "loadavg_start": os.getloadavg()}


def run_engine(raw: dict, out: Path) -> dict:
    from mira.config import validate
    from mira.federated.engine import Engine, Workspace

    cfg = validate(raw)
    t0 = time.perf_counter()
    ws = Workspace.load(cfg)
    load = time.perf_counter() - t0
    summary = Engine(ws, cfg, out, quiet=True).run()
    rounds = json.loads((out / "rounds.json").read_text())
    return {"mode": "engine", "load_s": load, "total_s": time.perf_counter() - t0,
            "round_s": [e["round_time_s"] for e in rounds], "eval_s": [e.get("eval_time_s") for e in rounds],
            "summary": summary}


def handler_times(fed) -> dict[int, float]:
    """round -> the slowest node's ``fit round r in X s`` (mira's ClientApp handler)."""
    import re

    out: dict[int, float] = {}
    for name, proc in fed.procs.items():
        if name.startswith("supernode_"):
            for rnd, sec in re.findall(r"\] fit round (\d+) in ([\d.]+)s", proc.text()):
                out[int(rnd)] = max(out.get(int(rnd), 0.0), float(sec))
    return out


PHASES = ("poll_s", "start_s", "input_s", "compute_s", "reply_s", "collect_s")


def fit_phases(work: Path, k: int) -> list[dict]:
    """Each fit message's path, from ``MIRA_FORKSERVER_DEBUG`` timestamps (the ServerApp's and one
    file per node), split into consecutive phases that add up to the message's latency (ServerApp
    push to ServerApp has the reply):

    * ``poll_s``: until the SuperNode receives it (the ServerApp pushes the round's messages to
      the SuperLink, the SuperNode's idle poll, capped at 0.3 s, pulls this one);
    * ``start_s``: until the ClientApp process runs (SuperExec picks the task up, the
      ``flwr-clientapp`` shim starts, the fork server forks; the SuperNode downloads meanwhile);
    * ``input_s``: until the ClientApp has its message (waiting for the download, pulling it);
    * ``compute_s``: the ClientApp's handler (mira's fit, in the warm worker);
    * ``reply_s``: until the SuperNode has sent the reply to the SuperLink;
    * ``collect_s``: until the ServerApp's poll pulls it.
    """
    import re

    # message id -> when the ServerApp began pushing its batch (where its path starts), when that
    # push call returned, when the ServerApp pulled its reply
    pushed, push_done, replied, pushing = {}, {}, {}, 0.0
    for line in (work / "debug_server.log").read_text().splitlines():
        fields = (line.split(maxsplit=4) + [""] * 5)[:5]
        try:
            t = float(fields[0])
        except ValueError:  # a short or torn line
            continue
        who, phase, mid = fields[2], fields[3], fields[4]
        if who != "serverapp":
            continue
        if phase == "pushing":
            pushing = t
        elif phase == "pushed" and mid:
            pushed.setdefault(mid, pushing)
            push_done.setdefault(mid, t)
        elif phase == "reply" and mid:
            replied.setdefault(mid, t)
    out = []
    for node in range(k):
        seg = None
        for line in (work / f"debug_node{node}.log").read_text().splitlines():
            t, _pid, who, text = (line.split(maxsplit=3) + ["", "", "", ""])[:4]
            try:
                t = float(t)
            except ValueError:
                continue
            m = re.match(r"Receiving: (\S+) message \(ID: ([0-9a-f]+)", text) if who == "supernode" else None
            if m:
                seg = {"node": node, "type": m.group(1), "id": m.group(2), "receiving": t} if "fit" in m.group(1) else None
                continue
            if seg is None:
                continue
            key = {("child", "start"): "child", ("child", "pull_task_input-end"): "input",
                   ("child", "push_message-begin"): "push"}.get((who, text.split()[0] if text else ""))
            if key:
                seg.setdefault(key, t)
                if key == "input" and "unavailable=" in text:
                    seg["unavailable"] = int(text.rsplit("unavailable=", 1)[1].split()[0])
            elif who == "supernode" and text.startswith("Received successfully"):
                seg.setdefault("received", t)
            elif who == "supernode" and text.startswith("Sent successfully") and "push" in seg:
                seg["sent"] = t
                if seg["id"] in pushed and seg["id"] in replied and {"child", "input"} <= set(seg):
                    marks = [pushed[seg["id"]], seg["receiving"], seg["child"], seg["input"], seg["push"],
                             seg["sent"], replied[seg["id"]]]
                    out.append({"node": node, "message": seg["id"][:12], "at": marks[0],
                                **{name: b - a for name, a, b in zip(PHASES, marks, marks[1:])},
                                "total_s": marks[-1] - marks[0],
                                # not on the path: when the ServerApp's push call returned, when the
                                # SuperNode had the whole message, how often the ClientApp found it missing
                                "push_call_s": push_done[seg["id"]] - marks[0],
                                "downloaded_s": seg.get("received", float("nan")) - marks[0],
                                "unavailable": seg.get("unavailable")})
                seg = None
    out.sort(key=lambda e: e["at"])
    return out


def run_flower(raw: dict, out: Path, work: Path, warm: bool, tls: bool = False, env: dict | None = None,
               phases: bool = False, server_poll: float | None = None) -> dict:
    from mira.federated.flower import bundle
    from mira.federated.flower.launch import LocalFederation
    from mira.federated.flower.settings import RunSettings

    fed = LocalFederation(work, tls=tls, auth=tls, env=env or {})
    handlers: dict[int, float] = {}
    try:
        t0 = time.perf_counter()
        if phases:  # one timestamp file per process group (the env of each process started next)
            fed.base_env["MIRA_FORKSERVER_DEBUG"] = str(work / "debug_server.log")
        fed.start_superlink()
        for i in range(K):
            if phases:
                fed.base_env["MIRA_FORKSERVER_DEBUG"] = str(work / f"debug_node{i}.log")
            fed.start_supernode(i, K, warm=warm)
        t_nodes = time.perf_counter()
        extra = {"poll": server_poll} if server_poll else {}
        run_id = fed.submit(bundle.config_text(raw), RunSettings(out_dir=str(out), **extra))
        t_submit = time.perf_counter()
        info = fed.wait(run_id, timeout=3600)
        total = time.perf_counter() - t_submit
        if info["status"] != "finished:completed":
            raise RuntimeError(f"run failed: {info}\n{fed.logs(run_id)[-3000:]}")
        handlers = handler_times(fed)
        msgs = fit_phases(work, K) if phases else []
    finally:
        left = fed.close()
        assert not left, left
    rounds = json.loads((out / "rounds.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    fl = summary.get("flower", {})
    n_msgs = int(fl.get("fit_messages", 0)) + int(fl.get("eval_messages", 0)) + K  # + one hello per node
    clientapp_s = (info.get("compute-time") or {}).get("clientapp-seconds")
    breakdown = [{"round": e["round"], "round_s": e["round_time_s"], "client_s": handlers.get(e["round"]),
                  "fixed_s": e["round_time_s"] - handlers[e["round"]] if e["round"] in handlers else None,
                  "train_step_s_per_client": e.get("train_step_time_s", 0.0) / K} for e in rounds]
    # a round's fit messages share their push batch's start ("at"): one batch per round, in order
    batches = sorted({m["at"] for m in msgs})
    if msgs and len(batches) != len(breakdown):
        print(f"phases: {len(batches)} push batches of fit messages for {len(breakdown)} rounds; not attributed",
              flush=True)
        batches = []
    for e, at in zip(breakdown, batches):  # the slowest message's phases, and the mean over the round's messages
        mine = [m for m in msgs if m["at"] == at]
        e["phase_messages"] = len(mine)
        if mine:
            slow = max(mine, key=lambda m: m["total_s"])
            e["phases_slowest"] = {p: round(slow[p], 3) for p in (*PHASES, "total_s")}
            e["phases_mean"] = {p: round(sum(m[p] for m in mine) / len(mine), 3) for p in (*PHASES, "total_s")}
            e["server_s"] = round(e["round_s"] - slow["total_s"], 3)  # the ServerApp's own work in the round
    return {"mode": None, "start_s": t_nodes - t0, "submit_s": t_submit - t_nodes, "run_total_s": total,
            "round_s": [e["round_time_s"] for e in rounds], "eval_s": [e.get("eval_time_s") for e in rounds],
            "breakdown": breakdown, "clientapp_s_per_msg": clientapp_s / n_msgs if clientapp_s else None,
            "summary": summary, "flwr_ls": {k: info.get(k) for k in ("network-traffic", "compute-time", "elapsed")},
            "fit_messages": msgs}


def per_client_round(res: dict) -> dict:
    s = res["summary"]
    fl = s.get("flower", {})
    rounds, out = s["rounds"], {}
    msgs = fl.get("fit_messages") or rounds * K
    out["adapter_raw_bytes"] = s["adapter_bytes"]  # float32 tensor bytes of what travels
    out["mira_wire_down"] = s["bytes_down"] / msgs if s["bytes_down"] else 0
    out["mira_wire_up"] = s["bytes_up"] / msgs if s["bytes_up"] else 0
    if fl:
        out["flower_msg_down"] = fl["fit_bytes_down"] / msgs
        out["flower_msg_up"] = fl["fit_bytes_up"] / msgs
        out["overhead_vs_raw_down"] = out["flower_msg_down"] / s["adapter_bytes"] - 1
        out["overhead_vs_raw_up"] = out["flower_msg_up"] / s["adapter_bytes"] - 1
        out["flower_eval_msg_down"] = fl["eval_bytes_down"] / max(1, fl["eval_messages"])
        traffic = res["flwr_ls"]["network-traffic"] or {}
        out["superlink_fleet_total_bytes"] = traffic.get("total-bytes")
        out["superlink_fleet_bytes_per_client_round"] = (traffic.get("total-bytes") or 0) / (K * rounds)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="cold,warm,warm-bf16")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                    help="override the config, e.g. --set 'lora.target_modules=[q_proj]'")
    ap.add_argument("--server-poll", type=float, default=None,
                    help="seconds between the ServerApp's pulls of replies (RunSettings.poll; default 0.5)")
    ap.add_argument("--phases", action="store_true",
                    help="time each fit message's phases (MIRA_FORKSERVER_DEBUG files; warm modes)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flower.json"))
    args = ap.parse_args(argv)
    raw = copy.deepcopy(CFG)
    raw["federation"]["rounds"] = raw["eval"]["every"] = args.rounds
    for item in args.set:
        import yaml

        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    info = machine()
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="mira-flower-bench-"))
    try:
        r = run_engine(raw, tmp / "engine")
        results.append(r)
        print(f"engine: rounds {[f'{x:.2f}' for x in r['round_s']]} s", flush=True)
        for mode in [m for m in args.modes.split(",") if m]:
            cfg = copy.deepcopy(raw)
            if mode.endswith("bf16"):
                cfg["federation"]["wire_dtype"] = "bfloat16"
            legacy = {"MIRA_FORKSERVER_OFF": "1", "MIRA_SUPERNODE_POLL": "3"} if mode.endswith("legacy") else None
            r = run_flower(cfg, tmp / mode, tmp / f"{mode}_fed", warm=mode.startswith("warm"), tls=mode.endswith("tls"),
                           env=legacy, phases=args.phases and mode.startswith("warm") and not legacy,
                           server_poll=args.server_poll)
            r["mode"] = mode
            results.append(r)
            print(f"{mode}: rounds {[f'{x:.2f}' for x in r['round_s']]} s, run {r['run_total_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()

    rows = []
    eng_round = sum(results[0]["round_s"]) / len(results[0]["round_s"])
    for r in results:
        b = per_client_round(r)
        mean_round = sum(r["round_s"]) / len(r["round_s"])
        rows.append({"mode": r["mode"], "mean_round_s": mean_round, "round_s": r["round_s"],
                     "slowdown_vs_engine": mean_round / eng_round, "eval_s": r["eval_s"],
                     "run_total_s": r.get("run_total_s", r.get("total_s")), "startup_s": r.get("start_s"),
                     "mean_local_test_loss": r["summary"]["mean_local_test_loss"], "bytes_per_client_round": b,
                     "breakdown": r.get("breakdown"), "clientapp_s_per_msg": r.get("clientapp_s_per_msg"),
                     "flwr_ls": r.get("flwr_ls"), "fit_messages": r.get("fit_messages")})
    doc = {"command": "MIRA_THREADS=1 python benchmarks/flower_bench.py " + " ".join(argv or sys.argv[1:]),
           "machine": info, "config": raw, "clients": K, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")

    print(f"\n{'mode':10} {'round s':>8} {'x engine':>8} {'raw B':>7} {'msg down B':>10} {'msg up B':>9} "
          f"{'overhead':>8} {'fleet B/client/round':>20} {'local loss':>10}")
    for row in rows:
        b = row["bytes_per_client_round"]
        print(f"{row['mode']:10} {row['mean_round_s']:8.2f} {row['slowdown_vs_engine']:8.1f} {b['adapter_raw_bytes']:7d} "
              f"{b.get('flower_msg_down', 0):10.0f} {b.get('flower_msg_up', 0):9.0f} "
              f"{b.get('overhead_vs_raw_down', 0):8.1%} {b.get('superlink_fleet_bytes_per_client_round', 0):20.0f} "
              f"{row['mean_local_test_loss']:10.4f}")
    for row in rows:
        for e in row.get("breakdown") or []:
            print(f"{row['mode']:12} round {e['round']}: {e['round_s']:.2f} s = client {e['client_s']} s "
                  f"(training {e['train_step_s_per_client']:.2f} s per client) + fixed "
                  f"{e['fixed_s'] if e['fixed_s'] is None else round(e['fixed_s'], 2)} s")
            if e.get("phases_slowest"):
                print(f"{'':12}   slowest fit message: " + ", ".join(f"{p[:-2]} {v:.2f}" for p, v in e["phases_slowest"].items())
                      + f" s; ServerApp's own work {e['server_s']:.2f} s")
        if row.get("clientapp_s_per_msg"):
            print(f"{row['mode']:12} Flower ClientApp compute time per message: {row['clientapp_s_per_msg']:.2f} s")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
