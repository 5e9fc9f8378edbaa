"""Aggregate the run directories of a `mira compare` (all finished seeds) into a table.

Useful when a comparison is still running or was stopped: every finished
`seed_<s>/<algorithm>/summary.json` counts. Usage:
    python benchmarks/summarize_compare.py runs/compare-dolly [--out benchmarks/results/compare-dolly.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--out")
    args = ap.parse_args()
    root = Path(args.run_dir)
    table: dict[str, dict] = {}
    for summary in sorted(root.glob("seed_*/*/summary.json")):
        s = json.loads(summary.read_text())
        e = table.setdefault(summary.parent.name, {"seeds": [], "local": [], "global": [], "bytes_up": [], "bytes_down": []})
        e["seeds"].append(s["seed"])
        e["local"].append(s["mean_local_test_loss"])
        e["global"].append(s["mean_global_test_loss"])
        e["bytes_up"].append(s["bytes_up"])
        e["bytes_down"].append(s["bytes_down"])
    out = {}
    lines = ["| algorithm | seeds | mean local test loss | mean global test loss | bytes up per run |", "|---|---|---|---|---|"]
    for label, e in table.items():
        row = {"seeds": e["seeds"], "mean_local_test_loss": float(np.mean(e["local"])),
               "mean_local_test_loss_std": float(np.std(e["local"])), "mean_global_test_loss": float(np.mean(e["global"])),
               "mean_global_test_loss_std": float(np.std(e["global"])), "bytes_up": float(np.mean(e["bytes_up"])),
               "bytes_down": float(np.mean(e["bytes_down"])), "per_seed": {"local": e["local"], "global": e["global"]}}
        out[label] = row
        lines.append(f"| {label} | {len(e['seeds'])} | {row['mean_local_test_loss']:.4f} ± {row['mean_local_test_loss_std']:.4f} "
                     f"| {row['mean_global_test_loss']:.4f} ± {row['mean_global_test_loss_std']:.4f} | {int(row['bytes_up']):,} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"run_dir": str(root), "algorithms": out}, indent=2))
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
