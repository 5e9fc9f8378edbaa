"""Model-GLUE reports: ``glue.json``, a Markdown table (``glue.md``) and a bar plot (``glue.png``)."""
from __future__ import annotations

import io
from pathlib import Path

from mira.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def markdown(result: dict) -> str:
    """Per-task validation (and test) loss of every entry; lower is better."""
    tasks = result["tasks"]
    lines = [(f"# Model-GLUE: {len(result['zoo']['members'])} {result['zoo']['kind']}s, "
              f"{len(result['clusters'])} cluster(s), strategy `{result['strategy']}`"), "",
             (f"Best single: **{result['best_single']}**; final: **{result['final']}** "
              f"(beats the best single on validation: {result['final_beats_best_single_val']}"
              + (f", on test: {result['final_beats_best_single_test']}" if "final_beats_best_single_test" in result
                 else "") + ")."), ""]
    for split in ("val", "test"):
        if not any(split in e for e in result["entries"]):
            continue
        lines += [f"## {split} loss per task (lower is better)", "",
                  "| entry | kind | " + " | ".join(tasks) + " | mean |",
                  "|---|---|" + "---:|" * (len(tasks) + 1)]
        for e in result["entries"]:
            mark = " ★" if e["name"] in (result["best_single"], result["final"]) else ""
            cells = " | ".join(f"{e[split][t]:.4f}" for t in tasks)
            lines.append(f"| {e['name']}{mark} | {e['kind']} | {cells} | {e[f'{split}_mean_loss']:.4f} |")
        lines.append("")
    lines += ["## clusters", ""]
    for i, c in enumerate(result["clusters"]):
        ws = ", ".join(f"{m} ({w:.2f})" for m, w in zip(c["members"], c["weights"]))
        lines.append(f"- cluster_{i} ({c['strategy']}): {ws}")
    return "\n".join(lines) + "\n"


def plot_png(result: dict) -> bytes:
    """Mean validation (and test) loss of every entry as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["entries"]
    names = [e["name"] for e in entries]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 4))
    x = range(len(names))
    has_test = all("test_mean_loss" in e for e in entries)
    width = 0.4 if has_test else 0.7
    ax.bar([i - (width / 2 if has_test else 0) for i in x], [e["val_mean_loss"] for e in entries], width, label="val")
    if has_test:
        ax.bar([i + width / 2 for i in x], [e["test_mean_loss"] for e in entries], width, label="test")
    lo = min(min(e["val_mean_loss"] for e in entries), min(e.get("test_mean_loss", 1e9) for e in entries))
    hi = max(max(e["val_mean_loss"] for e in entries), max(e.get("test_mean_loss", -1e9) for e in entries))
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6))
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean loss over tasks (lower is better)")
    ax.set_title(f"Model-GLUE ({result['strategy']}); final = {result['final']}")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_reports(result: dict, folder: Path) -> None:
    """Write ``glue.json``, ``glue.md`` and ``glue.png`` into ``folder`` (each atomically)."""
    atomic_write_json(folder / "glue.json", result)
    atomic_write_text(folder / "glue.md", markdown(result))
    atomic_write_bytes(folder / "glue.png", plot_png(result))
