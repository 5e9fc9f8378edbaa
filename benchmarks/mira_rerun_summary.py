"""Summarise MIRA reruns that were split over several ``mira compare`` folders (e.g. FedIT's
seeds in one, MIRA's in another), reading each run's ``summary.json``, ``metrics.jsonl`` and
``rounds.json`` directly:

    python benchmarks/mira_rerun_summary.py --baseline 'fedit(federation.lr=0.006)' \\
        --out benchmarks/results/mira-ni40.json runs/mira-exp40/ni/compare-*

Per algorithm: mean local and global test loss, ROUGE-L and the graph AUC at the last round,
mean +- 95% t half-width over seeds; the mean local test loss at every evaluated round (does the
baseline flatten?), and the local, global and validation loss curves (``--plot`` draws the first two); the test losses at
the round each algorithm's mean validation loss is lowest (early stopping, chosen on validation); and, against the baseline, the paired per-seed differences (same seed = same
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


METRICS = ("local_loss", "global_loss", "val_loss")


def client_rows(run: Path) -> list[dict]:
    """The per-client evaluation entries of a run's ``metrics.jsonl`` (read once per run)."""
    rows = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [e for e in rows if "client" in e]


def curve(rows: list[dict]) -> dict[str, dict[int, float]]:
    """Per metric (local, global, validation loss), the mean over the evaluated clients at each round."""
    by: dict[str, dict[int, list[float]]] = {m: defaultdict(list) for m in METRICS}
    for e in rows:
        for m in METRICS:
            if e.get(m) is not None:
                by[m][int(e["round"])].append(float(e[m]))
    return {m: {r: float(np.mean(v)) for r, v in sorted(rounds.items())} for m, rounds in by.items()}


def snapshot(local: float, global_: float | None, clients: dict[int, float]) -> dict:
    """One seed of one algorithm, as ``paired`` compares it: mean local and global test loss, and each
    client's local test loss."""
    return {"local": float(local), "global": global_, "clients": clients}


def at_round(rows: list[dict], r: int) -> dict:
    """The ``snapshot`` of round ``r`` (global: None unless every client has one)."""
    at = [e for e in rows if int(e["round"]) == r and e.get("local_loss") is not None]
    glo = [e.get("global_loss") for e in at]
    return snapshot(np.mean([e["local_loss"] for e in at]),
                    float(np.mean(glo)) if all(g is not None for g in glo) else None,
                    {int(e["client"]): float(e["local_loss"]) for e in at})


def paired(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """``a`` - ``b`` over their common seeds (same seed = same data sample): the mean local and global
    differences with 95% t half-widths, and per-client wins / ties / losses (|difference| <= TIE)."""
    common = sorted(set(a) & set(b))
    d_local, d_global, wins = [], [], [0, 0, 0]
    for s in common:
        x, y = a[s], b[s]
        d_local.append(x["local"] - y["local"])
        if x["global"] is not None and y["global"] is not None:
            d_global.append(x["global"] - y["global"])
        for k, v in x["clients"].items():
            diff = v - y["clients"][k]
            wins[0 if diff < -TIE else 1 if abs(diff) <= TIE else 2] += 1
    return {"seeds": common,
            "d_local": {"mean": float(np.mean(d_local)), "ci95": ci95(d_local), "per_seed": d_local},
            "d_global": {"mean": float(np.mean(d_global)) if d_global else None,
                         "ci95": ci95(d_global) if d_global else None, "per_seed": d_global},
            "clients_better_tied_worse": wins}


def stopped_on_validation(rows: dict[str, dict[int, list[dict]]], doc: dict, baseline: str) -> dict:
    """Early stopping as a tuned hyperparameter: for each algorithm, the evaluated round with the lowest mean
    validation loss (over clients and seeds), and the test losses there; paired against the baseline at its
    own chosen round (same seed = same data)."""
    chosen, per_seed = {}, {}
    for label, seeds in rows.items():
        c = doc["algorithms"][label]["curves"]["val_loss"]
        if not c["rounds"]:
            continue
        r = c["rounds"][int(np.argmin(c["mean"]))]
        per_seed[label] = {s: at_round(seed_rows, r) for s, seed_rows in seeds.items()}
        loc = [v["local"] for v in per_seed[label].values()]
        glo = [v["global"] for v in per_seed[label].values() if v["global"] is not None]
        chosen[label] = {"round": r, "val_loss": float(min(c["mean"])),
                         "local": {"mean": float(np.mean(loc)), "ci95": ci95(loc), "per_seed": loc},
                         "global": {"mean": float(np.mean(glo)) if glo else None, "ci95": ci95(glo) if glo else None,
                                    "per_seed": glo}}
    if baseline in per_seed:
        for label in chosen:
            if label != baseline:
                chosen[label]["paired"] = paired(per_seed[label], per_seed[baseline])
    return chosen


def plot(doc: dict, path: str) -> None:
    """Mean local and global test loss per evaluated round, every algorithm, band = 95% t half-width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mira.report.plots import wrap_label

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in zip(axes, ("local_loss", "global_loss"), ("mean local test loss", "mean global test loss")):
        for label, row in doc["algorithms"].items():
            c = row["curves"][metric]
            if not c["rounds"]:
                continue
            r, m, h = np.array(c["rounds"]), np.array(c["mean"]), np.nan_to_num(np.array(c["ci95"]))
            ax.plot(r, m, marker="o", ms=3, label=f"{wrap_label(label, 70)} ({len(row['seeds'])} seeds)")
            ax.fill_between(r, m - h, m + h, alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per response token)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
    lines = sum(lab.count("\n") + 1 for lab in labels)
    fig.tight_layout(rect=(0, 0.03 + 0.045 * lines, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--baseline", required=True, help="the label of the algorithm to pair against")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="PNG of the local and global test loss curves")
    args = ap.parse_args(argv)
    found = runs(args.folders)
    if args.baseline not in found:
        raise SystemExit(f"no finished run of the baseline {args.baseline!r}; found {sorted(found)}")
    doc = {"folders": args.folders, "baseline": args.baseline, "algorithms": {}, "paired": {}}
    rows = {label: {s: client_rows(p) for s, p in seeds.items()} for label, seeds in found.items()}
    final: dict[str, dict[int, dict]] = {}  # the snapshot of each run's summary.json
    for label, seeds in sorted(found.items()):
        sums = {s: json.loads((p / "summary.json").read_text()) for s, p in sorted(seeds.items())}
        final[label] = {s: snapshot(v["mean_local_test_loss"], v.get("mean_global_test_loss"),
                                    {c["id"]: c["local_test_loss"] for c in v["clients"]}) for s, v in sums.items()}
        row = {"seeds": sorted(sums)}
        for key in ("mean_local_test_loss", "mean_global_test_loss", "mean_rouge_l", "graph_auc_last"):
            vals = [v[key] for v in sums.values() if v.get(key) is not None]
            row[key] = {"mean": float(np.mean(vals)) if vals else None, "ci95": ci95(vals) if vals else None,
                        "per_seed": vals}
        curves = [curve(r) for r in rows[label].values()]
        row["curves"] = {}
        for m in METRICS:
            rounds = sorted(set.intersection(*(set(c[m]) for c in curves)))
            row["curves"][m] = {"rounds": rounds, "mean": [float(np.mean([c[m][r] for c in curves])) for r in rounds],
                                "ci95": [ci95([c[m][r] for c in curves]) for r in rounds]}
        local = row["curves"]["local_loss"]
        row["local_loss_by_round"] = dict(zip(local["rounds"], local["mean"]))
        doc["algorithms"][label] = row
    for label in sorted(found):
        if label != args.baseline:
            doc["paired"][label] = paired(final[label], final[args.baseline])
    doc["stopped_on_validation"] = stopped_on_validation(rows, doc, args.baseline)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot:
        plot(doc, args.plot)
    for label, row in doc["algorithms"].items():
        loc, glo = row["mean_local_test_loss"], row["mean_global_test_loss"]
        auc = row["graph_auc_last"]["mean"]
        print(f"{label[:70]:70} seeds {row['seeds']}: local {loc['mean']:.4f} +- {loc['ci95']:.4f}, "
              f"global {glo['mean']:.4f} +- {glo['ci95']:.4f}, ROUGE-L {row['mean_rouge_l']['mean']:.3f}"
              + (f", graph AUC {auc:.3f}" if auc is not None else ""))
        for m in METRICS:
            c = row["curves"][m]
            if c["rounds"]:
                print(f"{'':70} {m} by round: " + ", ".join(f"{r}: {v:.3f}" for r, v in zip(c["rounds"], c["mean"])))
    for label, p in doc["paired"].items():
        print(f"{label[:70]:70} - baseline, seeds {p['seeds']}: local {p['d_local']['mean']:+.4f} +- "
              f"{p['d_local']['ci95']:.4f} {[round(x, 4) for x in p['d_local']['per_seed']]}, global "
              f"{p['d_global']['mean']:+.4f} +- {p['d_global']['ci95']:.4f}, clients better/tied/worse "
              f"{p['clients_better_tied_worse']}")
    for label, c in doc["stopped_on_validation"].items():
        line = (f"{label[:70]:70} stopped on validation at round {c['round']} (val {c['val_loss']:.4f}): local "
                f"{c['local']['mean']:.4f} +- {c['local']['ci95']:.4f}")
        if c["global"]["mean"] is not None:
            line += f", global {c['global']['mean']:.4f} +- {c['global']['ci95']:.4f}"
        if "paired" in c:
            p = c["paired"]
            line += (f"; - baseline at its round: local {p['d_local']['mean']:+.4f} +- {p['d_local']['ci95']:.4f} "
                     f"{[round(x, 4) for x in p['d_local']['per_seed']]}")
            if p["d_global"]["mean"] is not None:
                line += f", global {p['d_global']['mean']:+.4f} +- {p['d_global']['ci95']:.4f}"
            line += f", clients better/tied/worse {p['clients_better_tied_worse']}"
        print(line)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
