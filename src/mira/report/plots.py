"""PNG plots of runs and comparisons (matplotlib, Agg backend)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _curves(rows: list[dict]) -> tuple[list[int], list[float], list[float]]:
    by_round: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_round[r["round"]].append(r)
    rounds = sorted(by_round)
    return (rounds, [float(np.mean([r["local_loss"] for r in by_round[t]])) for t in rounds],
            [float(np.mean([r["global_loss"] for r in by_round[t]])) for t in rounds])


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_run(out: Path, rows: list[dict], name: str) -> None:
    if not rows:
        return
    rounds, local, glob = _curves(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, local, marker="o", label="mean local test loss")
    ax.plot(rounds, glob, marker="s", label="mean global test loss")
    ax.set(xlabel="round", ylabel="loss", title=f"{name}: test loss over rounds")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, Path(out) / "plots" / "loss_curves.png")

    last = [r for r in rows if r["round"] == rounds[-1]]
    x = np.arange(len(last))
    fig, ax = plt.subplots(figsize=(max(6, len(last) * 0.7), 4))
    ax.bar(x - 0.2, [r["local_loss"] for r in last], 0.4, label="local test loss")
    ax.bar(x + 0.2, [r["global_loss"] for r in last], 0.4, label="global test loss")
    ax.set_xticks(x, [f"{r['client']}\n{r['task'][:14]}" for r in last], fontsize=7)
    ax.set(ylabel="loss", title=f"{name}: per-client test loss (round {rounds[-1]})")
    ax.legend()
    _save(fig, Path(out) / "plots" / "client_losses.png")


def plot_compare(out: Path, results: dict[str, dict]) -> None:
    """``results[algo] = {"summary": ..., "rows": [...]}`` (one seed) or with mean/std (several)."""
    out = Path(out)
    algos = list(results)
    local = [results[a]["summary"]["mean_local_test_loss"] for a in algos]
    glob = [results[a]["summary"]["mean_global_test_loss"] for a in algos]
    x = np.arange(len(algos))
    fig, ax = plt.subplots(figsize=(max(6, len(algos) * 1.1), 4))
    ax.bar(x - 0.2, local, 0.4, label="mean local test loss")
    ax.bar(x + 0.2, glob, 0.4, label="mean global test loss")
    ax.set_xticks(x, algos)
    lo = min(local + glob)
    ax.set_ylim(max(0, lo - 0.15 * (max(local + glob) - lo + 1e-9) - 0.05), None)
    ax.set(ylabel="loss", title="algorithms compared")
    ax.legend()
    _save(fig, out / "comparison.png")

    first = results[algos[0]]["summary"]["clients"]
    xc = np.arange(len(first))
    w = 0.8 / len(algos)
    fig, ax = plt.subplots(figsize=(max(7, len(first) * 1.0), 4))
    for i, a in enumerate(algos):
        ax.bar(xc - 0.4 + w * (i + 0.5), [c["local_test_loss"] for c in results[a]["summary"]["clients"]], w, label=a)
    ax.set_xticks(xc, [f"{c['id']}\n{c['task'][:14]}" for c in first], fontsize=7)
    ax.set(ylabel="local test loss", title="per-client local test loss")
    ax.legend(fontsize=7, ncol=3)
    _save(fig, out / "client_local_loss.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for a in algos:
        rounds, l, g = _curves(results[a]["rows"])
        axes[0].plot(rounds, l, marker=".", label=a)
        axes[1].plot(rounds, g, marker=".", label=a)
    axes[0].set(xlabel="round", ylabel="mean local test loss", title="local loss")
    axes[1].set(xlabel="round", ylabel="mean global test loss", title="global loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, out / "loss_curves.png")
