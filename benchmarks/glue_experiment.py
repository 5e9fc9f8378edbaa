"""Model-GLUE on a real zoo: the per-client Dolly adapters of a MIRA run (stories260K).

Zoo: ``RUN/adapters/client_*`` (one adapter per Dolly category, task from ``summary.json``).
Validation / test: per category, records the run did **not** train or test on (the run drew
``max_per_task`` records per category with ``data.seed``; the rest is held out), 16 for
validation (strategy selection, router centroids) and 24 for test (reporting).

Question: does the Model-GLUE recipe (cluster -> selective merge -> router) beat the best
single adapter on the mean loss over the 8 tasks?

    export MIRA_ASSETS=/work/shared MIRA_THREADS=1
    python benchmarks/glue_experiment.py [--run runs/compare-dolly/seed_0/mira] [--run ...]

Writes ``benchmarks/results/glue.json`` (and each variant's report under ``runs/glue-bench/``).

``--router-study``: does the router route? For each ``--seeds`` value (the draw of the held-out
validation/test records), one zoo with every adapter its own expert (threshold 0.95), and per
gate (``centroid`` at the old fixed temperature 0.05, ``centroid`` with the temperature
calibrated on validation, ``linear`` trained on validation): own-task routing accuracy on the
held-out test prompts, weight entropy, and test loss of the hard router, the soft LoRA mixture,
the uniform delta average and the best single expert. Writes ``benchmarks/results/glue_router.json``.

    python benchmarks/glue_experiment.py --router-study --seeds 1 2 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("MIRA_THREADS", "1")

from mira.config import DataConfig
from mira.data.records import Record, load_records
from mira.glue import run_glue
from mira.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def held_out(dolly: Path, run: Path, n_val: int, n_test: int, seed: int = 1) -> tuple[list[Record], list[Record]]:
    """Per category, ``n_val`` + ``n_test`` Dolly records that the run's clients never saw."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data = cfg.get("data", {})
    used = set(load_records(DataConfig(source="dolly", path=str(dolly), max_per_task=data.get("max_per_task", 125),
                                       seed=data.get("seed", 0)), seed=data.get("seed", 0)))
    rest: dict[str, list[Record]] = {}
    for r in load_records(DataConfig(source="dolly", path=str(dolly), max_per_task=None)):
        if r not in used:
            rest.setdefault(r.task, []).append(r)
    rng = random.Random(seed)
    val, test = [], []
    for task in sorted(rest):
        group = rest[task]
        rng.shuffle(group)
        val += group[:n_val]
        test += group[n_val:n_val + n_test]
    return val, test


def write_jsonl(path: Path, records: list[Record]) -> None:
    atomic_write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=None, help="federated run folder(s) whose adapters form the zoo")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/glue.json"))
    ap.add_argument("--work", default=str(ROOT / "runs/glue-bench"))
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--budget", type=int, default=40,
                    help="CMA-ES evaluations per cluster (40: the best member + 4 generations of 8 + 7)")
    ap.add_argument("--router-study", action="store_true", help="the router study instead of the four variants")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="held-out draws (router study)")
    args = ap.parse_args()
    if args.router_study:
        return router_study(args)
    assets = Path(os.environ.get("MIRA_ASSETS", "/work/shared"))
    dolly = assets / "data/dolly-15k/databricks-dolly-15k.jsonl"
    model = assets / "models/stories260K"
    runs = [Path(r).resolve() for r in (args.run or [str(ROOT / "runs/compare-dolly/seed_0/mira")])]
    work = Path(args.work)
    t_start = time.perf_counter()
    results: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
                                f"{torch.get_num_threads()} thread(s)",
                     "n_val_per_task": args.n_val, "n_test_per_task": args.n_test, "variants": []}
    for run in runs:
        if not (run / "summary.json").exists():
            raise SystemExit(f"{run} has no summary.json (run not finished?)")
        val, test = held_out(dolly, run, args.n_val, args.n_test)
        data_dir = work / run.name / "data"
        write_jsonl(data_dir / "val.jsonl", val)
        write_jsonl(data_dir / "test.jsonl", test)
        variants = [
            ("threshold 0.95 (default), heuristic_coefficient", 0.95, "heuristic_coefficient"),
            ("threshold 0.4, heuristic_coefficient", 0.4, "heuristic_coefficient"),
            ("one cluster, heuristic_average", -1.0, "heuristic_average"),
            ("one cluster, evolutionary", -1.0, "evolutionary"),
        ]
        for label, threshold, strategy in variants:
            zoo = {"base_model": str(model), "run": str(run),
                   "validation": {"path": str(data_dir / "val.jsonl"), "max_per_task": args.n_val, "max_length": 256, "template": "compact", "overflow": "truncate_input"},
                   "test": {"path": str(data_dir / "test.jsonl"), "max_per_task": args.n_test, "max_length": 256, "template": "compact", "overflow": "truncate_input"},
                   "cluster": {"threshold": threshold},
                   "strategy": {"name": strategy, "budget": args.budget},
                   "mixture": {"kind": "router", "train_steps": 0}}
            t0 = time.perf_counter()
            res = run_glue(zoo, work / run.name / strategy / f"t{threshold}", overwrite=True,
                           log=lambda s: print(s, flush=True))
            by = {e["name"]: e for e in res["entries"]}
            best, final = by[res["best_single"]], by[res["final"]]
            row = {"run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run), "variant": label,
                   "threshold": threshold, "strategy": strategy, "clusters": res["clusters"],
                   "similarity_offdiag_mean": _offdiag_mean(res["similarity"]),
                   "best_single": res["best_single"], "final": res["final"],
                   "val_mean_loss": {k: round(e["val_mean_loss"], 4) for k, e in by.items()},
                   "test_mean_loss": {k: round(e["test_mean_loss"], 4) for k, e in by.items()},
                   "final_minus_best_single_test": round(final["test_mean_loss"] - best["test_mean_loss"], 4),
                   "final_beats_best_single_test": res["final_beats_best_single_test"],
                   "final_beats_best_single_val": res["final_beats_best_single_val"],
                   "evaluations": res["evaluations"], "seconds": round(time.perf_counter() - t0, 1)}
            results["variants"].append(row)
            print(json.dumps({k: row[k] for k in ("run", "variant", "best_single", "final",
                                                  "final_minus_best_single_test", "seconds")}))
            results["seconds"] = round(time.perf_counter() - t_start, 1)
            atomic_write_json(args.out, results)
    print(f"wrote {args.out} in {results['seconds']} s")


GATES = [("centroid, T=0.05 (before)", {"gate": "centroid", "temperature": 0.05}),
         ("centroid, calibrated T", {"gate": "centroid", "temperature": "auto"}),
         ("linear gate", {"gate": "linear"})]


def router_study(args) -> None:
    assets = Path(os.environ.get("MIRA_ASSETS", "/work/shared"))
    dolly = assets / "data/dolly-15k/databricks-dolly-15k.jsonl"
    model = assets / "models/stories260K"
    run = Path(args.run[0] if args.run else ROOT / "runs/compare-dolly/seed_0/mira").resolve()
    out = Path(args.out if args.out != str(ROOT / "benchmarks/results/glue.json")
               else ROOT / "benchmarks/results/glue_router.json")
    work = Path(args.work) / "router"
    t_start = time.perf_counter()
    results: dict = {"machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU core(s) "
                                f"(shared), torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
                     "run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
                     "n_val_per_task": args.n_val, "n_test_per_task": args.n_test, "rows": []}
    for seed in args.seeds:
        val, test = held_out(dolly, run, args.n_val, args.n_test, seed=seed)
        data_dir = work / f"seed_{seed}" / "data"
        write_jsonl(data_dir / "val.jsonl", val)
        write_jsonl(data_dir / "test.jsonl", test)
        for label, gate in GATES:
            es = {"max_length": 256, "template": "compact", "overflow": "truncate_input"}
            zoo = {"base_model": str(model), "run": str(run),
                   "validation": {"path": str(data_dir / "val.jsonl"), "max_per_task": args.n_val, **es},
                   "test": {"path": str(data_dir / "test.jsonl"), "max_per_task": args.n_test, **es},
                   "cluster": {"threshold": 0.95}, "strategy": {"name": "heuristic_coefficient"},
                   "mixture": {"kind": "lora", **gate}, "seed": seed}
            t0 = time.perf_counter()
            res = run_glue(zoo, work / f"seed_{seed}" / gate["gate"] / str(gate.get("temperature", "")),
                           overwrite=True, log=lambda s: print(s, flush=True))
            by = {e["name"]: e for e in res["entries"]}
            members = [e for e in res["entries"] if e["kind"] == "member"]
            best_test = min(members, key=lambda e: e["test_mean_loss"])  # best single, chosen on test (optimistic)
            r = by["router"]
            row = {"seed": seed, "gate": label, "experts": len(res["clusters"]),
                   "test_routing_accuracy": r["test_accuracy"], "val_routing_accuracy": r["val_accuracy"],
                   "temperature": r["temperature"], "test_weight_entropy": round(r["test_weight_entropy"], 4),
                   "test_max_weight": round(r["test_max_weight"], 4),
                   "test_loss": {"router": round(r["test_mean_loss"], 4),
                                 "lora_mixture": round(by["lora_mixture"]["test_mean_loss"], 4),
                                 "uniform_delta_average": round(by["uniform_delta_average"]["test_mean_loss"], 4),
                                 "best_single_by_val": round(by[res["best_single"]]["test_mean_loss"], 4),
                                 "best_single_by_test": round(best_test["test_mean_loss"], 4)},
                   "seconds": round(time.perf_counter() - t0, 1)}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            results["seconds"] = round(time.perf_counter() - t_start, 1)
            atomic_write_json(out, results)
    print(f"wrote {out} in {results['seconds']} s")


def _offdiag_mean(sim: list[list[float]]) -> float:
    n = len(sim)
    vals = [sim[i][j] for i in range(n) for j in range(n) if i != j]
    return round(sum(vals) / len(vals), 4) if vals else 1.0


if __name__ == "__main__":
    main()
