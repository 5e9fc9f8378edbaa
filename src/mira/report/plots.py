"""PNG plots of runs and comparisons (matplotlib, Agg backend)."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def _curves(rows: list[dict]) -> tuple[list[int], list[float], list[float]]:
    by_round: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_round[r["round"]].append(r)
    rounds = sorted(by_round)

    def glob(t: int) -> float:  # nan where the global loss was not computed (eval.global_loss): a gap in the curve
        vals = [r.get("global_loss") for r in by_round[t]]
        return float(np.mean(vals)) if vals and all(v is not None for v in vals) else float("nan")
    return (rounds, [float(np.mean([r["local_loss"] for r in by_round[t]])) for t in rounds], [glob(t) for t in rounds])


def wrap_label(label: str, width: int = 38) -> str:
    """A long algorithm label (``mira(graph=similarity,...,lambda=2)``) on several lines, broken after commas."""
    if len(label) <= width:
        return label
    lines, line = [], ""
    for part in re.split(r"(?<=,)", label):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join(lines + [line])


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")  # nothing cut off (a legend outside the axes included)
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
    ax.bar(x + 0.2, [_num(r.get("global_loss")) for r in last], 0.4, label="global test loss")
    ax.set_xticks(x, [f"{r['client']}\n{r['task'][:14]}" for r in last], fontsize=7)
    ax.set(ylabel="loss", title=f"{name}: per-client test loss (round {rounds[-1]})")
    ax.legend()
    _save(fig, Path(out) / "plots" / "client_losses.png")


def _num(v) -> float:
    """A loss that may be missing (None: not computed) as a float for matplotlib (nan: not drawn)."""
    return float("nan") if v is None else float(v)


def _colors(n: int):
    """``n`` distinguishable colours (tab10, then tab20 for more than ten)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


_STYLES = ["-", "--", "-.", ":"]


def plot_compare(out: Path, results: dict[str, dict]) -> None:
    """``results[algo] = {"summary": ..., "rows": [...]}`` (one seed) or with mean/std (several).

    Horizontal bars with the algorithm names on the y axis, so that labels never overlap however
    many algorithms there are; the legends sit outside the axes."""
    out = Path(out)
    algos = list(results)
    local = [results[a]["summary"]["mean_local_test_loss"] for a in algos]
    glob = [_num(results[a]["summary"].get("mean_global_test_loss")) for a in algos]
    _save(comparison_figure(algos, local, glob), out / "comparison.png")
    _compare_details(out, results, algos)


def comparison_figure(algos: list[str], local: list[float], glob: list[float]):
    """The figure of ``comparison.png`` (separate, so a test can check that its labels do not overlap)."""
    labels = [wrap_label(a) for a in algos]
    lines = max(lab.count("\n") + 1 for lab in labels) if labels else 1
    y = np.arange(len(algos))
    # a row tall enough for its label's lines; the figure wide enough for the labels and a readable plot
    fig, ax = plt.subplots(figsize=(10, max(3.0, (0.3 + 0.14 * lines) * len(algos) + 1.6)))
    ax.barh(y - 0.2, local, 0.4, label="mean local test loss")
    ax.barh(y + 0.2, glob, 0.4, label="mean global test loss")
    ax.set_yticks(y, labels, fontsize=7 if lines > 1 else 8)
    ax.invert_yaxis()  # the first algorithm on top, as in comparison.md
    shown = [v for v in local + glob if np.isfinite(v)]
    lo, hi = min(shown), max(shown)
    ax.set_xlim(max(0, lo - 0.15 * (hi - lo + 1e-9) - 0.05), hi + 0.12 * (hi - lo + 1e-9) + 0.02)
    for yy, (lv, gv) in enumerate(zip(local, glob)):
        ax.text(lv, yy - 0.2, f" {lv:.3f}", va="center", fontsize=7)
        if np.isfinite(gv):
            ax.text(gv, yy + 0.2, f" {gv:.3f}", va="center", fontsize=7)
    ax.set_xlabel("loss (lower is better)")
    ax.set_title("algorithms compared", pad=24)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _compare_details(out: Path, results: dict[str, dict], algos: list[str]) -> None:
    colors = _colors(len(algos))
    first = results[algos[0]]["summary"]["clients"]
    xc = np.arange(len(first))
    w = 0.8 / len(algos)
    fig, ax = plt.subplots(figsize=(max(7, len(first) * 1.1) + 2.5, 4.5))
    for i, a in enumerate(algos):
        ax.bar(xc - 0.4 + w * (i + 0.5), [c["local_test_loss"] for c in results[a]["summary"]["clients"]], w,
               label=wrap_label(a, 60),
               color=colors[i])
    ax.set_xticks(xc, [f"{c['id']}: {c['task'][:16]}" for c in first], fontsize=7, rotation=30, ha="right")
    vals = [c["local_test_loss"] for a in algos for c in results[a]["summary"]["clients"]]
    lo, hi = min(vals), max(vals)
    ax.set_ylim(max(0, lo - 0.15 * (hi - lo + 1e-9) - 0.05), None)
    ax.set(ylabel="local test loss", title="per-client local test loss")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, out / "client_local_loss.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, a in enumerate(algos):
        rounds, l, g = _curves(results[a]["rows"])
        style = dict(color=colors[i], linestyle=_STYLES[(i // 10) % len(_STYLES)], marker=".", label=wrap_label(a, 60))
        axes[0].plot(rounds, l, **style)
        axes[1].plot(rounds, g, **style)
    axes[0].set(xlabel="round", ylabel="mean local test loss", title="local loss")
    axes[1].set(xlabel="round", ylabel="mean global test loss", title="global loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    _save(fig, out / "loss_curves.png")


def plot_graph_auc(out: Path, rounds_log: list[dict], name: str) -> None:
    """``plots/graph_auc.png``: per round, how well the task graph separates same-task pairs."""
    pts = [(e["round"], e["graph_auc"]) for e in rounds_log if "graph_auc" in e]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r for r, _ in pts], [v for _, v in pts], marker="o", label="graph AUC (same vs different task)")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    scaled = [e["round"] for e in rounds_log if e.get("step_scaled")]
    if scaled:
        ax.plot(scaled, [dict(pts).get(r, np.nan) for r in scaled], "x", color="red", label="step scaled down")
    ax.set(xlabel="round", ylabel="ROC AUC", ylim=(0, 1.02), title=f"{name}: learned task graph")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, Path(out) / "plots" / "graph_auc.png")
