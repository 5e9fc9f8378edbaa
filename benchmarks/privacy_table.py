"""Privacy-utility table: mean local / global test loss vs epsilon on Dolly (intact prompts).

Mechanisms (see docs/privacy.md):
* fedit + central client-level DP (DP-FedAvg, Poisson sampling q = fraction);
* mira + local client-level DP (noise on every upload: MIRA's server keeps individual adapters);
* fedit + sample-level DP-SGD (Opacus) inside each client;
with ``local`` (no client sends anything: private by construction) and the non-private runs
(epsilon = inf) as references. epsilon in {8, 4, 1}, delta = 1e-3, >= 3 seeds, each seed also
draws its own data sample. The clip norm C of the client-level mechanisms is the median update norm
of a non-private FedIT run on seed 0 (training data only, no test loss involved); DP-SGD clips each
example's gradient to 1.0. Learning rates are the example's (not re-tuned under noise).

Usage: MIRA_ASSETS=../shared .venv/bin/python benchmarks/privacy_table.py [--seeds 0,1,2] [--out runs/privacy]
Writes <out>/privacy.json and benchmarks/results/privacy.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mira.config import load_config, validate  # noqa: E402
from mira.federated.compare import ci95, config_for  # noqa: E402
from mira.federated.engine import Engine, Workspace  # noqa: E402
from mira.io import atomic_write_json, atomic_write_text  # noqa: E402

DELTA = 1e-3
EPSILONS = [8.0, 4.0, 1.0]
SETTING = [  # the federation: 20 clients (4 per Dolly category), half of them per round
    "partition.clients_per_task=4", "data.max_per_task=300", "partition.test_size=15",
    "federation.fraction=0.5", "federation.rounds=8", "eval.every=8", "plots=false",
]


def runs(clip: float) -> list[tuple[str, str, float | None, dict]]:
    out = [("local", "local", None, {}), ("fedit", "fedit", None, {}), ("mira", "mira", None, {})]
    for eps in EPSILONS:
        out.append(("fedit + central DP", "fedit", eps,
                    {"client": {"mode": "central", "epsilon": eps, "delta": DELTA, "clip_norm": clip}}))
        out.append(("mira + local DP", "mira", eps,
                    {"client": {"mode": "local", "epsilon": eps, "delta": DELTA, "clip_norm": clip}}))
        out.append(("fedit + DP-SGD", "fedit", eps, {"sample": {"epsilon": eps, "delta": DELTA, "max_grad_norm": 1.0}}))
    return out


def config(base: dict, name: str, privacy: dict, seed: int):
    """``mira compare``'s config of (algorithm, seed): the seed also draws the data sample."""
    return config_for(validate({**copy.deepcopy(base), "privacy": privacy}), name, {}, seed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "examples" / "dolly.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(ROOT / "runs" / "privacy"))
    ap.add_argument("--set", action="append", default=[], help="extra overrides, e.g. federation.rounds=2")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    cfg, _ = load_config(a.config, SETTING + a.set)
    base = cfg.model_dump(mode="json")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # C: the median update norm of a non-private FedIT run (seed 0), read off a noiseless DP-FedAvg
    # with a clip no update reaches
    probe_cfg = config(base, "fedit", {"client": {"noise_multiplier": 0.0, "clip_norm": 1e9, "delta": DELTA}}, seeds[0])
    ws0 = Workspace.load(probe_cfg)
    probe = Engine(ws0, probe_cfg, out / "probe", quiet=True)
    probe.run()
    clip = float(statistics.median(e["dp_update_norm_median"] for e in probe.rounds_log if e.get("dp_update_norm_median")))
    print(f"clip norm C = {clip:.4f} (median update norm, non-private fedit, seed {seeds[0]})", flush=True)

    results = []
    for seed in seeds:
        ws = ws0 if seed == seeds[0] else None
        for label, name, eps, privacy in runs(clip):
            c = config(base, name, privacy, seed)
            if ws is None:
                ws = Workspace.load(c)
            run_dir = out / f"{label.replace(' ', '').replace('+', '_')}-eps{eps or 'inf'}-seed{seed}"
            tr = time.time()
            s = Engine(ws, c, run_dir, quiet=True).run()
            priv = s.get("privacy", {})
            rep = priv.get("client") or priv.get("sample") or {}
            row = {"label": label, "algorithm": name, "epsilon_target": eps, "seed": seed,
                   "epsilon": rep.get("epsilon"), "noise_multiplier": rep.get("noise_multiplier"),
                   "local": s["mean_local_test_loss"], "global": s["mean_global_test_loss"],
                   "round_time_s": s["round_time_s"] / max(1, s["rounds"]), "wall_s": time.time() - tr}
            results.append(row)
            print(json.dumps(row), flush=True)
            atomic_write_json(out / "privacy.json", {"clip_norm": clip, "delta": DELTA, "rows": results})

    table = summarize(results, clip, seeds, time.time() - t0)
    res = ROOT / "benchmarks" / "results"
    atomic_write_json(res / "privacy.json", {"clip_norm": clip, "delta": DELTA, "setting": SETTING + a.set,
                                             "seeds": seeds, "rows": results})
    atomic_write_text(res / "privacy.md", table)
    print(table)


def summarize(rows: list[dict], clip: float, seeds: list[int], wall: float) -> str:
    keys = []
    for r in rows:
        k = (r["label"], r["epsilon_target"])
        if k not in keys:
            keys.append(k)
    ref = {(r["seed"]): r for r in rows if r["label"] == "local"}
    lines = ["| mechanism | target epsilon | epsilon spent | noise multiplier | mean local test loss | "
             "mean global test loss | local loss − `local` (paired) | round time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, eps in keys:
        sel = [r for r in rows if r["label"] == label and r["epsilon_target"] == eps]
        loc = [r["local"] for r in sel]
        glo = [r["global"] for r in sel]
        diff = [r["local"] - ref[r["seed"]]["local"] for r in sel if r["seed"] in ref]
        spent = [r["epsilon"] for r in sel if r["epsilon"] is not None]
        z = [r["noise_multiplier"] for r in sel if r["noise_multiplier"] is not None]
        lines.append(
            f"| {label} | {'∞' if eps is None else f'{eps:g}'} | {max(spent):.2f} | " if spent else
            f"| {label} | {'∞' if eps is None else f'{eps:g}'} | ∞ | ")
        lines[-1] += (f"{np.mean(z):.3g} | " if z else "0 | ")
        lines[-1] += (f"{np.mean(loc):.4f} ± {ci95(loc):.4f} | {np.mean(glo):.4f} ± {ci95(glo):.4f} | "
                      f"{np.mean(diff):+.4f} ± {ci95(diff):.4f} | {np.mean([r['round_time_s'] for r in sel]):.2f} |")
    lines += ["", f"Seeds {seeds} (each also draws its own data sample); mean ± half-width of the 95% t-interval. "
              f"delta = {DELTA:g}; client-level clip norm C = {clip:.4f}; DP-SGD per-example clip 1.0. "
              f"Total wall time {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
