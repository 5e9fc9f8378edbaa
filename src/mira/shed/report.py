"""Write a refinement: the refined JSONL, ``shed.json`` and ``shed_values.png`` (all atomic).

The JSONL holds one object per selected record with ``Record``'s fields (``instruction``,
``input``, ``output``, ``task``), so ``--source json`` reads it back unchanged. The
report and the plot go next to it.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from mira.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from mira.shed.refine import RefineResult


def plot_values(result: RefineResult) -> bytes:
    """PNG: histogram of the proxies' Shapley values, and values by rank with selected clusters marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = result.values
    chosen = set(result.indices)
    cand = np.asarray(result.candidates)
    frac = np.array([np.mean([int(p) in chosen for p in cand[m]]) for m in result.clustering.members])
    order = np.argsort(-values, kind="stable")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(values, bins=min(40, max(5, len(values) // 3)), color="tab:blue", alpha=0.8)
    axes[0].set(xlabel="Shapley value of the cluster proxy", ylabel="clusters",
                title=f"{len(values)} clusters, {result.settings.iterations} iterations")
    cmap = matplotlib.colormaps["viridis"]
    axes[1].bar(np.arange(len(values)), values[order], color=cmap(frac[order]), width=1.0)
    fig.colorbar(matplotlib.cm.ScalarMappable(cmap=cmap), ax=axes[1], label="fraction of the cluster kept")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set(xlabel="cluster rank", ylabel="value",
                title=f"{result.settings.strategy}: {len(result.indices)} records selected")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(result: RefineResult, out: str | Path, plot: bool = True) -> dict[str, Path]:
    """Write ``out`` (JSONL), ``shed.json`` and ``shed_values.png`` in ``out``'s folder."""
    out = Path(out)
    folder = out.parent
    paths = {"refined": out, "report": folder / "shed.json"}
    atomic_write_text(out, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in result.records))
    report = result.report()
    report["output"] = str(out)
    atomic_write_json(paths["report"], report)
    if plot:
        paths["plot"] = folder / "shed_values.png"
        atomic_write_bytes(paths["plot"], plot_values(result))
    return paths
