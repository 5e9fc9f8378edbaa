"""Round-time overhead of differential privacy (in-process engine, the embedded default's workload).

fedit on builtin:demo (8 clients, 8 local steps of batch 8, full participation), 3 rounds, without
DP, with central DP-FedAvg (q = 1), local DP, and DP-SGD (Opacus per-example gradients); the runs
alternate, ``--repeats`` times each. Reports the mean server round time and the pure training-step
time per round (rounds.json). SecAgg+'s overhead on Flower: benchmarks/secagg_bench.py.

Usage: .venv/bin/python benchmarks/privacy_overhead.py [--repeats 3]   (writes benchmarks/results/privacy_overhead.json)
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mira.config import load_config, validate  # noqa: E402
from mira.federated.engine import Engine, Workspace  # noqa: E402
from mira.io import atomic_write_json  # noqa: E402

VARIANTS = {
    "none": {},
    "central DP-FedAvg": {"client": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-2}},
    "local DP": {"client": {"mode": "local", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-2}},
    "DP-SGD (Opacus)": {"sample": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cfg, _ = load_config(None, ["algorithm.name=fedit", "federation.rounds=3", "eval.every=3", "plots=false"])
    base = cfg.model_dump(mode="json")
    ws = Workspace.load(cfg)
    times = {k: [] for k in VARIANTS}
    steps = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for name, privacy in VARIANTS.items():
                raw = copy.deepcopy(base)
                if privacy:
                    raw["privacy"] = privacy
                eng = Engine(ws, validate(raw), Path(tmp) / f"{rep}-{len(times[name])}-{name[:5]}", quiet=True)
                eng.run()
                times[name] += [e["round_time_s"] for e in eng.rounds_log]
                steps[name] += [e["train_step_time_s"] for e in eng.rounds_log]
    ref = float(np.mean(times["none"]))
    rows = [{"variant": k, "round_time_s": float(np.mean(v)), "round_time_sd": float(np.std(v, ddof=1)),
             "train_step_time_s": float(np.mean(steps[k])), "overhead_x": float(np.mean(v)) / ref,
             "rounds": len(v)} for k, v in times.items()]
    out = {"machine": f"{platform.machine()}, {platform.system()}, 2 CPU cores", "workload": "fedit, builtin:demo, "
           "8 clients x 8 steps x batch 8, 3 rounds", "repeats": a.repeats, "rows": rows}
    atomic_write_json(ROOT / "benchmarks" / "results" / "privacy_overhead.json", out)
    print("| privacy | round time (s) | training-step time per round (s) | × without |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['round_time_s']:.2f} ± {r['round_time_sd']:.2f} | {r['train_step_time_s']:.2f} | "
              f"{r['overhead_x']:.2f} |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
