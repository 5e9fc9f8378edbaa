"""Summarise MIRA reruns that were split over several ``mira compare`` folders (e.g. FedIT's
seeds in one, MIRA's in another), reading each run's ``summary.json``, ``metrics.jsonl`` and
``rounds.json`` directly:

    python benchmarks/mira_rerun_summary.py --baseline 'fedit(federation.lr=0.006)' \\
        --out benchmarks/results/mira-ni40.json runs/mira-exp40/ni/compare-*

Per algorithm: mean local and global test loss, ROUGE-L and the graph AUC at the last round,
mean +- 95% t half-width over seeds; the mean local test loss at every evaluated round (does the
baseline flatten?); and, against the baseline, the paired per-seed differences (same seed = same
data sample) and per-client wins / ties / losses (|difference| <= 0.005 is a tie). Only
finished runs (a ``summary.json``) count.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

TIE = 0.005


def ci95(xs) -> float:
    from mira.federated.compare import ci95 as ci

    return float(ci(list(xs))) if len(xs) > 1 else float("nan")


def runs(folders: list[str]) -> dict[str, dict[int, Path]]:
    out: dict[str, dict[int, Path]] = defaultdict(dict)
    for folder in folders:  # seed_N/LABEL/ (several seeds) or LABEL/ (a compare of one seed)
        for summary in sorted(Path(folder).glob("seed_*/*/summary.json")) + sorted(Path(folder).glob("*/summary.json")):
            m = re.match(r"seed_(\d+)$", summary.parent.parent.name)
            seed = int(m.group(1)) if m else int(json.loads(summary.read_text())["seed"])
            label = summary.parent.name
            if seed in out[label]:
                raise SystemExit(f"{label} seed {seed} is in two folders: {out[label][seed]} and {summary.parent}")
            out[label][seed] = summary.parent
    return out


def curve(run: Path) -> dict[int, float]:
    by_round: dict[int, list[float]] = defaultdict(list)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("local_loss") is not None and "client" in e:
            by_round[int(e["round"])].append(float(e["local_loss"]))
    return {r: float(np.mean(v)) for r, v in sorted(by_round.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--baseline", required=True, help="the label of the algorithm to pair against")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    found = runs(args.folders)
    if args.baseline not in found:
        raise SystemExit(f"no finished run of the baseline {args.baseline!r}; found {sorted(found)}")
    doc = {"folders": args.folders, "baseline": args.baseline, "algorithms": {}, "paired": {}}
    for label, seeds in sorted(found.items()):
        sums = {s: json.loads((p / "summary.json").read_text()) for s, p in sorted(seeds.items())}
        row = {"seeds": sorted(sums)}
        for key in ("mean_local_test_loss", "mean_global_test_loss", "mean_rouge_l", "graph_auc_last"):
            vals = [v[key] for v in sums.values() if v.get(key) is not None]
            row[key] = {"mean": float(np.mean(vals)) if vals else None, "ci95": ci95(vals) if vals else None,
                        "per_seed": vals}
        curves = [curve(p) for p in seeds.values()]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        row["local_loss_by_round"] = {r: float(np.mean([c[r] for c in curves])) for r in common}
        doc["algorithms"][label] = row
    base = found[args.baseline]
    for label, seeds in sorted(found.items()):
        if label == args.baseline:
            continue
        common = sorted(set(seeds) & set(base))
        d_local, d_global, wins = [], [], [0, 0, 0]
        for s in common:
            a, b = (json.loads((x[s] / "summary.json").read_text()) for x in (seeds, base))
            d_local.append(a["mean_local_test_loss"] - b["mean_local_test_loss"])
            if a.get("mean_global_test_loss") is not None and b.get("mean_global_test_loss") is not None:
                d_global.append(a["mean_global_test_loss"] - b["mean_global_test_loss"])
            theirs = {c["id"]: c["local_test_loss"] for c in b["clients"]}
            for c in a["clients"]:
                diff = c["local_test_loss"] - theirs[c["id"]]
                wins[0 if diff < -TIE else 1 if abs(diff) <= TIE else 2] += 1
        doc["paired"][label] = {
            "seeds": common,
            "d_local": {"mean": float(np.mean(d_local)), "ci95": ci95(d_local), "per_seed": d_local},
            "d_global": {"mean": float(np.mean(d_global)) if d_global else None,
                         "ci95": ci95(d_global) if d_global else None, "per_seed": d_global},
            "clients_better_tied_worse": wins}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    for label, row in doc["algorithms"].items():
        loc, glo = row["mean_local_test_loss"], row["mean_global_test_loss"]
        auc = row["graph_auc_last"]["mean"]
        print(f"{label[:70]:70} seeds {row['seeds']}: local {loc['mean']:.4f} +- {loc['ci95']:.4f}, "
              f"global {glo['mean']:.4f} +- {glo['ci95']:.4f}, ROUGE-L {row['mean_rouge_l']['mean']:.3f}"
              + (f", graph AUC {auc:.3f}" if auc is not None else ""))
        print(f"{'':70} local loss by round: " + ", ".join(f"{r}: {v:.3f}" for r, v in row["local_loss_by_round"].items()))
    for label, p in doc["paired"].items():
        print(f"{label[:70]:70} - baseline, seeds {p['seeds']}: local {p['d_local']['mean']:+.4f} +- "
              f"{p['d_local']['ci95']:.4f} {[round(x, 4) for x in p['d_local']['per_seed']]}, global "
              f"{p['d_global']['mean']:+.4f} +- {p['d_global']['ci95']:.4f}, clients better/tied/worse "
              f"{p['clients_better_tied_worse']}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
