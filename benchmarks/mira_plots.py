"""Figures for docs/mira.md from a finished ``benchmarks/mira_experiment.py`` comparison.

    .venv/bin/python benchmarks/mira_plots.py runs/mira-exp/dolly/compare dolly

Writes docs/img/mira-<name>-curves.png (mean local test loss per evaluation round, every
algorithm, mean ± 95% t half-width over the seeds; FedIT's curve is its global adapter on each
client's test split, so its flattening shows there) and docs/img/mira-<name>-graph-auc.png
(the learned graph's task AUC per round and, with estimator_diagnostics, every estimator's on the
same updates), and prints the per-round numbers as JSON (benchmarks/results/mira-<name>-rounds.json).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from mira.federated.compare import ci95, paired_vs_baseline  # noqa: E402


def short(label: str) -> str:
    """``mira(graph=similarity,...,federation.lr=0.024,lambda=0.5)`` -> ``mira-sim lr 0.024 λ 0.5``."""
    name, _, rest = label.partition("(")
    opts = dict(o.split("=", 1) for o in rest.rstrip(")").split(",") if "=" in o)
    out = name + ("-sim" if opts.get("graph") == "similarity" else "")
    if "federation.lr" in opts:
        out += f" lr {opts['federation.lr']}"
    for k, sym in (("lambda", "λ"), ("mu", "μ")):
        if k in opts:
            out += f" {sym} {opts[k]}"
    return out


def main(cmp_dir: str, name: str) -> None:
    cmp_dir = Path(cmp_dir)
    result = json.loads((cmp_dir / "comparison.json").read_text())
    labels, seeds = list(result["algorithms"]), result["seeds"]
    curves: dict[str, dict[int, list[float]]] = {}
    aucs: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label in labels:
        per_round: dict[int, list[float]] = defaultdict(list)
        for s in seeds:
            run = cmp_dir / f"seed_{s}" / label
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            by = defaultdict(list)
            for r in rows:
                by[r["round"]].append(r["local_loss"])
            for t, v in by.items():
                per_round[t].append(float(np.mean(v)))
            for e in json.loads((run / "rounds.json").read_text()):
                if "graph_auc" in e:
                    aucs[f"{short(label)} (used)"][e["round"]].append(e["graph_auc"])
                for est, v in (e.get("graph_auc_estimators") or {}).items():
                    if v is not None:
                        aucs[f"estimator {est}"][e["round"]].append(v)
        curves[label] = per_round

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, per_round in curves.items():
        t = sorted(per_round)
        m = np.array([np.mean(per_round[r]) for r in t])
        h = np.array([ci95(per_round[r]) for r in t])
        ax.plot(t, m, marker="o", label=short(label))
        ax.fill_between(t, m - h, m + h, alpha=0.15)
    ax.set(xlabel="round", ylabel="mean local test loss", title=f"{name}: local test loss (mean ± 95% CI, {len(seeds)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / f"mira-{name}-curves.png", dpi=110)
    plt.close(fig)

    if aucs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, per_round in aucs.items():
            t = sorted(per_round)
            ax.plot(t, [np.mean(per_round[r]) for r in t], marker="." if "estimator" in key else "o",
                    linestyle="--" if "estimator" in key else "-", label=key)
        ax.axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
        ax.axhline(0.5, color="grey", linewidth=0.8)
        ax.set(xlabel="round", ylabel="task AUC of a_kl", ylim=(0.3, 1.02),
               title=f"{name}: learned graph, same-task vs different-task pairs (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "img" / f"mira-{name}-graph-auc.png", dpi=110)
        plt.close(fig)

    # the learned graph against the random one: paired per seed (same data) and per client
    sim = next((lb for lb in labels if "graph=similarity" in lb), None)
    rnd = next((lb for lb in labels if lb.startswith("mira(") and "graph=" not in lb), None)
    paired = None
    if sim and rnd:  # compare's own paired rows, with the random-graph MIRA as the baseline
        per_seed = {lb: {s: json.loads((cmp_dir / f"seed_{s}" / lb / "summary.json").read_text()) for s in seeds}
                    for lb in (sim, rnd)}
        row = paired_vs_baseline(per_seed, [sim, rnd], seeds, rnd)["algorithms"][sim]
        paired = {"a": sim, "b": rnd, "mean_local_test_loss": row["local"], "mean_global_test_loss": row["global"],
                  "clients_better_tied_worse": [row["clients"][k] for k in ("wins", "ties", "losses")]}
    out = {"similarity_vs_random": paired, "curves": {short(lb): {str(t): {"mean": float(np.mean(v)), "ci95": ci95(v)} for t, v in sorted(c.items())}
                      for lb, c in curves.items()},
           "graph_auc": {k: {str(t): {"mean": float(np.mean(v)), "ci95": ci95(v), "n": len(v)}
                             for t, v in sorted(c.items())} for k, c in aucs.items()}}
    (ROOT / "benchmarks" / "results" / f"mira-{name}-rounds.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
