"""Flower runtime benchmark: bytes on the wire per client per round, and the per-round
time of a 3-node loopback federation against the in-process engine on the same work.

    MIRA_THREADS=1 python benchmarks/flower_bench.py [--rounds 3] [--modes cold,warm,warm-bf16]

Runs, on one machine:

* ``engine``: ``mira run``'s in-process engine (``Engine.run``) on the config below;
* ``cold``: a SuperLink and 3 SuperNodes on 127.0.0.1 (insecure), Flower's default
  ClientApp: a fresh process per message that loads the model;
* ``warm``: the same with ``--warm`` SuperNodes (a worker keeps the model loaded);
* ``warm-bf16``: warm, with ``federation.wire_dtype: bfloat16``;
* ``warm-tls``: warm, with TLS and SuperNode authentication.

Bytes come from Flower's side: the serialised size of every message the ServerApp
pushes and pulls (``protocol.payload_bytes``: all objects of the message, i.e. what the
SuperLink stores and a SuperNode pulls, before HTTP/TLS framing), and the SuperLink's
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


def run_flower(raw: dict, out: Path, work: Path, warm: bool, tls: bool = False) -> dict:
    from mira.federated.flower import bundle
    from mira.federated.flower.launch import LocalFederation
    from mira.federated.flower.settings import RunSettings

    fed = LocalFederation(work, tls=tls, auth=tls)
    try:
        t0 = time.perf_counter()
        fed.start_superlink()
        fed.start_supernodes(K, warm=warm)
        t_nodes = time.perf_counter()
        run_id = fed.submit(bundle.config_text(raw), RunSettings(out_dir=str(out)))
        t_submit = time.perf_counter()
        info = fed.wait(run_id, timeout=3600)
        total = time.perf_counter() - t_submit
        if info["status"] != "finished:completed":
            raise RuntimeError(f"run failed: {info}\n{fed.logs(run_id)[-3000:]}")
    finally:
        left = fed.close()
        assert not left, left
    rounds = json.loads((out / "rounds.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {"mode": None, "start_s": t_nodes - t0, "submit_s": t_submit - t_nodes, "run_total_s": total,
            "round_s": [e["round_time_s"] for e in rounds], "eval_s": [e.get("eval_time_s") for e in rounds],
            "summary": summary, "flwr_ls": {k: info.get(k) for k in ("network-traffic", "compute-time", "elapsed")}}


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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flower.json"))
    args = ap.parse_args(argv)
    raw = copy.deepcopy(CFG)
    raw["federation"]["rounds"] = raw["eval"]["every"] = args.rounds
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
            r = run_flower(cfg, tmp / mode, tmp / f"{mode}_fed", warm=mode.startswith("warm"), tls=mode.endswith("tls"))
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
                     "flwr_ls": r.get("flwr_ls")})
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
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
