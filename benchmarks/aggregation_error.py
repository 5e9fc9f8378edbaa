"""Per-round LoRA aggregation error of a `mira compare` with `fedit` and `fedit:aggregation=exact`,
plus paired differences of every algorithm against a reference (same seed = same data).

* FedAvg (``fedit``): ``||mean(B) mean(A) - mean(B A)||_F / ||mean(B A)||_F`` per module,
  averaged over modules (``fedavg_error_mean``; ``_max`` = the worst module), from each run's
  ``rounds.json``.
* exact (``fedit(aggregation=exact)``): the truncated-SVD error ``||M - B A||_F / ||M||_F`` of
  its rank-r re-factoring (``svd_error_mean``), and what FedAvg would have made of the same
  uploads (``fedavg_error_mean`` of that run).

Usage:
    python benchmarks/aggregation_error.py runs/compare-dolly-issue16 \
        --plot docs/img/aggregation_error.png --out benchmarks/results/aggregation_error.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FEDAVG, EXACT = "fedit", "fedit(aggregation=exact)"


def series(root: Path, label: str, key: str) -> np.ndarray:
    """seeds x rounds array of ``key`` (rounds that lack it are dropped)."""
    rows = []
    for d in sorted(root.glob(f"seed_*/{label}/rounds.json"), key=lambda p: p.parts[-3]):
        rows.append([e[key] for e in json.loads(d.read_text()) if key in e])
    return np.array(rows, dtype=float)


def ci95(v) -> float:
    from scipy import stats

    v = np.asarray(v, dtype=float)
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def paired(root: Path, ref: str) -> dict:
    """Per algorithm: mean and 95% t-CI of (algorithm - ref) over seeds, local and global loss."""
    out: dict = {}
    seeds = sorted(p.name for p in root.glob("seed_*"))
    labels = sorted({p.parent.name for p in root.glob("seed_*/*/summary.json")})
    for label in labels:
        d = {"local": [], "global": []}
        for s in seeds:
            a, b = root / s / label / "summary.json", root / s / ref / "summary.json"
            if a.exists() and b.exists():
                sa, sb = json.loads(a.read_text()), json.loads(b.read_text())
                d["local"].append(sa["mean_local_test_loss"] - sb["mean_local_test_loss"])
                d["global"].append(sa["mean_global_test_loss"] - sb["mean_global_test_loss"])
        out[label] = {k: {"mean": float(np.mean(v)), "ci95": ci95(v), "n": len(v)} for k, v in d.items() if v}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--plot")
    ap.add_argument("--out")
    ap.add_argument("--ref", default="fedit", help="reference of the paired differences")
    args = ap.parse_args()
    root = Path(args.run_dir)
    data = {
        "fedavg_error_mean (fedit)": series(root, FEDAVG, "fedavg_error_mean"),
        "fedavg_error_max (fedit)": series(root, FEDAVG, "fedavg_error_max"),
        "svd_error_mean (exact)": series(root, EXACT, "svd_error_mean"),
        "svd_error_max (exact)": series(root, EXACT, "svd_error_max"),
        "fedavg_error_mean on exact's uploads": series(root, EXACT, "fedavg_error_mean"),
    }
    result = {"run_dir": str(root), "per_round_mean_over_seeds": {k: v.mean(0).tolist() for k, v in data.items()},
              "per_seed": {k: v.tolist() for k, v in data.items()},
              "paired_vs_" + args.ref: paired(root, args.ref)}
    for k, v in data.items():
        print(f"{k:40s}", " ".join(f"{x:.4f}" for x in v.mean(0)))
    print(f"\npaired difference vs {args.ref} (negative = lower loss than {args.ref}), mean ± 95% t-CI over seeds:")
    for label, d in result["paired_vs_" + args.ref].items():
        print(f"  {label:28s} local {d['local']['mean']:+.4f} ± {d['local']['ci95']:.4f}   "
              f"global {d['global']['mean']:+.4f} ± {d['global']['ci95']:.4f}  (n={d['local']['n']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        styles = {"fedavg_error_mean (fedit)": ("C0", "-", "FedAvg (fedit): mean over modules"),
                  "fedavg_error_max (fedit)": ("C0", ":", "FedAvg (fedit): worst module"),
                  "svd_error_mean (exact)": ("C3", "-", "exact: SVD truncation, mean over modules"),
                  "svd_error_max (exact)": ("C3", ":", "exact: SVD truncation, worst module")}
        for k, (color, ls, name) in styles.items():
            v = data[k]
            x = np.arange(1, v.shape[1] + 1)
            ax.plot(x, v.mean(0), color=color, ls=ls, marker="o" if ls == "-" else None, ms=3, label=name)
            if ls == "-":
                ax.fill_between(x, v.min(0), v.max(0), color=color, alpha=0.15, lw=0)
        ax.set_xlabel("round")
        ax.set_ylabel(r"relative Frobenius error of the aggregated $\Delta W$")
        ax.set_title(f"LoRA aggregation error per round ({data['svd_error_mean (exact)'].shape[0]} seeds; "
                     "band: min-max)", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=130)


if __name__ == "__main__":
    main()
