"""MIRA's claim tested (docs/mira.md): tune every algorithm on validation with the same budget,
then compare the tuned algorithms over 3 seeds (each seed also draws its own data sample).

    MIRA_ASSETS=../shared .venv/bin/python benchmarks/mira_experiment.py [dolly ni] [--jobs 2]

For each dataset (examples/mira-dolly.yaml: 20 clients, 5 Dolly categories x 4;
examples/mira-ni.yaml: 16 clients, 8 Natural Instructions tasks x 2; fraction 0.25, 20 rounds x
5 local steps, stories260K):

1. ``mira tune`` per algorithm, 6 grid points each, seed 0, selection by mean validation loss
   (the global loss is not computed while tuning: ``eval.global_loss=never``); FedIT and local
   first (learning rate only), then FedProx and MIRA (3 learning rates around FedIT's choice x 2
   values of mu / lambda, MIRA's eta fixed at 0.1);
2. ``mira compare`` of the tuned algorithms (each spec carries its own ``federation.lr`` and
   options), seeds 0,1,2, baseline FedIT, global loss and ROUGE-L at the last round.

Runs go to runs/mira-exp/<dataset>/; an interrupted experiment continues where it stopped
(finished tunes are read back, a compare resumes). Results are copied to
benchmarks/results/mira-<dataset>.{json,md} and the plots to docs/img/mira-<dataset>-*.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIRA = str(ROOT / ".venv" / "bin" / "mira")
CONFIGS = {"dolly": "examples/mira-dolly.yaml", "ni": "examples/mira-ni.yaml"}
SIM = "mira:graph=similarity,similarity_average=true,eta=0.1,estimator_diagnostics=true"
# name -> (spec, grid); every algorithm gets 6 points. FedIT and local search the learning rate alone
# (local's range sits lower: a client alone overfits its ~50 examples sooner); the algorithms with a
# second hyper-parameter search 3 learning rates around FedIT's validation choice (b/2, b, 2b) x 2
# values of it ("fedit_lr": filled in once FedIT's tune has finished).
ALGORITHMS = {
    "fedit": ("fedit", {"federation.lr": [0.003, 0.006, 0.012, 0.024, 0.048, 0.096]}),
    "local": ("local", {"federation.lr": [0.00075, 0.0015, 0.003, 0.006, 0.012, 0.024]}),
    "fedprox": ("fedprox", {"federation.lr": "fedit_lr", "algorithm.mu": [0.01, 0.1]}),
    "mira": ("mira:eta=0.1", {"federation.lr": "fedit_lr", "algorithm.lambda": [0.1, 0.5]}),
    "mira-sim": (SIM, {"federation.lr": "fedit_lr", "algorithm.lambda": [0.1, 0.5]}),
}
FIRST = ("fedit", "local")  # tuned first; the others' learning-rate grid depends on FedIT's choice
COMPARE_SET = ["eval.global_loss=final", "eval.generation=final", "eval.max_examples=6", "eval.max_new_tokens=48"]


def sh(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "a") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}; see {log}")


def grid_for(ds: str, name: str) -> dict:
    grid = dict(ALGORITHMS[name][1])
    if grid.get("federation.lr") == "fedit_lr":
        b = json.loads((ROOT / "runs" / "mira-exp" / ds / "tune-fedit" / "tune.json").read_text())["best"]
        lr = b["params"]["federation.lr"]
        grid["federation.lr"] = [round(lr / 2, 6), lr, round(lr * 2, 6)]
    return grid


def tune(ds: str, name: str) -> dict:
    spec, grid = ALGORITHMS[name][0], grid_for(ds, name)
    out = ROOT / "runs" / "mira-exp" / ds / f"tune-{name}"
    state = out / "tune.json"
    if not (state.exists() and json.loads(state.read_text()).get("status") == "finished"):
        if out.exists():
            shutil.rmtree(out)  # a tune is cheap to redo; half a grid would bias the choice
        cmd = [MIRA, "tune", CONFIGS[ds], "-a", spec, "--seeds", "0", "--out", str(out), "-q",
               "--set", "eval.global_loss=never"]
        for key, values in grid.items():
            cmd += ["--grid", f"{key}={json.dumps(values)}"]
        sh(cmd, out.parent / f"tune-{name}.log")
    return json.loads(state.read_text())


def tuned_spec(name: str, best: dict) -> str:
    spec, _ = ALGORITHMS[name]
    opts = [f"{k.split('.', 1)[1] if k.startswith('algorithm.') else k}={v}" for k, v in best["params"].items()]
    return spec + ("," if ":" in spec else ":") + ",".join(opts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("datasets", nargs="*", default=list(CONFIGS))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    if "MIRA_ASSETS" not in os.environ:
        sys.exit("set MIRA_ASSETS to the folder holding data/ and models/ (e.g. ../shared)")
    tuned = {}
    for stage in (FIRST, [n for n in ALGORITHMS if n not in FIRST]):
        jobs = [(ds, name) for ds in args.datasets for name in stage]
        with ThreadPoolExecutor(args.jobs) as pool:
            tuned.update(zip(jobs, pool.map(lambda j: tune(*j), jobs)))

    def run_compare(ds: str) -> None:
        specs = [tuned_spec(name, tuned[(ds, name)]["best"]) for name in ALGORITHMS]  # specs[0]: FedIT
        out = ROOT / "runs" / "mira-exp" / ds / "compare"
        state = out / "comparison.json"
        if state.exists() and json.loads(state.read_text()).get("status") == "finished":
            pass
        elif state.exists():
            sh([MIRA, "compare", "--resume", str(out), "-q"], out.parent / "compare.log")
        else:
            from mira.federated.compare import parse_spec

            baseline = parse_spec(specs[0])[0]
            cmd = [MIRA, "compare", CONFIGS[ds], "-a", ",".join(specs), "--seeds", "0,1,2", "--baseline", baseline,
                   "--out", str(out), "-q"]
            for s in COMPARE_SET:
                cmd += ["--set", s]
            sh(cmd, out.parent / "compare.log")
        res = ROOT / "benchmarks" / "results"
        result = json.loads(state.read_text())
        result["tuning"] = {name: {"spec": ALGORITHMS[name][0], "grid": grid_for(ds, name),
                                   "best": tuned[(ds, name)]["best"],
                                   "points": [{"params": p["params"], "mean_val_loss": p["mean_val_loss"]}
                                              for p in tuned[(ds, name)]["points"]]} for name in ALGORITHMS}
        (res / f"mira-{ds}.json").write_text(json.dumps(result, indent=1))
        shutil.copy(out / "comparison.md", res / f"mira-{ds}.md")
        for png in ("comparison.png", "loss_curves.png"):
            if (out / png).exists():
                shutil.copy(out / png, ROOT / "docs" / "img" / f"mira-{ds}-{png}")
        print(f"{ds}: {res / f'mira-{ds}.md'}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run_compare, args.datasets))


if __name__ == "__main__":
    main()
