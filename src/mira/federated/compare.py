"""``mira compare``: several algorithms on identical data, model and seed(s).

An algorithm spec is a registered name, optionally with options after a colon:
``mira:graph=similarity`` or ``fedprox:mu=0.1``. Options of the config's
``algorithm`` section apply to every algorithm that accepts them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from mira.config import RunConfig, validate
from mira.errors import MiraError
from mira.data.report import totals
from mira.federated.engine import Engine, Workspace
from mira.federated.strategies import get_strategy
from mira.io import atomic_write_json, atomic_write_text
from mira.report.progress import NullProgress


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``"mira:graph=similarity,lambda=1"`` -> (label, name, options)."""
    name, _, rest = spec.strip().partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        if "=" not in item:
            raise MiraError(f"algorithm option {item!r} must be key=value", where=f"--algorithms {spec}")
        k, v = item.split("=", 1)
        opts[k.strip()] = yaml.safe_load(v)
    get_strategy(name)
    label = name if not opts else f"{name}({','.join(f'{k}={v}' for k, v in opts.items())})"
    return label, name, opts


def config_for(cfg: RunConfig, name: str, opts: dict, seed: int, vary_data: bool = True) -> RunConfig:
    raw = cfg.model_dump(mode="json")
    cls = get_strategy(name)
    accepted = set(cls.Params.model_fields) | {f.alias for f in cls.Params.model_fields.values() if f.alias}
    base_opts = {k: v for k, v in cfg.algorithm.params().items() if k in accepted}
    raw["algorithm"] = {"name": name, **base_opts, **opts}
    raw["seed"] = seed
    if vary_data:  # each seed also draws its own data sample and split, so the spread covers the data
        raw["data"]["seed"] = cfg.data.seed + seed
    return validate(raw)


def check_specs(cfg: RunConfig, specs: list[str], seeds: list[int], vary_data: bool = True) -> list[tuple]:
    """Parse every spec and validate the config of every (algorithm, seed), before anything runs."""
    parsed = [parse_spec(s) for s in specs]
    labels = [p[0] for p in parsed]
    if len(set(labels)) != len(labels):
        raise MiraError("an algorithm appears twice", where="--algorithms")
    for seed in seeds:
        for _, name, opts in parsed:
            config_for(cfg, name, opts, seed, vary_data)
    return parsed


def compare(cfg: RunConfig, specs: list[str], out: str | Path, seeds: list[int], progress=None,
            log=lambda s: None, vary_data: bool = True) -> dict:
    out = Path(out)
    progress = progress or NullProgress()
    parsed = check_specs(cfg, specs, seeds, vary_data)
    labels = [p[0] for p in parsed]
    per_seed: dict[str, list[dict]] = {label: [] for label in labels}
    last_rows: dict[str, list[dict]] = {}
    data_per_seed: list[dict] = []
    for seed in seeds:
        seed_cfg = config_for(cfg, parsed[0][1], parsed[0][2], seed, vary_data)
        ws = Workspace.load(seed_cfg, log)
        data_per_seed.append({"seed": seed, "data_seed": seed_cfg.data.seed, **totals(ws.data_report)})
        for label, name, opts in parsed:
            run_cfg = config_for(cfg, name, opts, seed, vary_data)
            run_dir = out / (f"seed_{seed}" if len(seeds) > 1 else "") / label
            engine = Engine(ws, run_cfg, run_dir)
            summary = engine.run(progress=progress)
            per_seed[label].append(summary)
            last_rows[label] = engine.rows
            log(f"seed {seed} {label}: local {summary['mean_local_test_loss']:.4f} "
                f"global {summary['mean_global_test_loss']:.4f}")
    table = {}
    for label in labels:
        runs = per_seed[label]
        entry = {"seeds": seeds}
        for key in ("mean_local_test_loss", "mean_global_test_loss", "bytes_up", "bytes_down", "wall_time_s",
                    "mean_rouge_l", "mean_exact_match"):
            vals = [r[key] for r in runs if key in r]
            if vals:
                entry[key] = float(np.mean(vals))
                entry[f"{key}_std"] = float(np.std(vals))
                entry[f"{key}_ci95"] = ci95(vals)
        entry["per_seed"] = [{"seed": s, "mean_local_test_loss": r["mean_local_test_loss"],
                              "mean_global_test_loss": r["mean_global_test_loss"]} for s, r in zip(seeds, runs)]
        table[label] = entry
    result = {"config": cfg.model_dump(mode="json"), "vary_data": vary_data, "data": data_per_seed,
              "prompt_intact_fraction": float(np.mean([d["prompt_intact_fraction"] for d in data_per_seed])),
              "algorithms": table}
    atomic_write_json(out / "comparison.json", result)
    atomic_write_text(out / "comparison.md", markdown_table(table, result["prompt_intact_fraction"]))
    if cfg.plots:
        from mira.report.plots import plot_compare

        plot_compare(out, {label: {"summary": {**per_seed[label][-1],
                                               "mean_local_test_loss": table[label]["mean_local_test_loss"],
                                               "mean_global_test_loss": table[label]["mean_global_test_loss"]},
                                   "rows": last_rows[label]} for label in labels})
    return result


def ci95(vals) -> float:
    """Half-width of the 95% Student-t confidence interval of the mean (0 for one value)."""
    if len(vals) < 2:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / np.sqrt(len(vals)))


def markdown_table(table: dict, intact: float | None = None) -> str:
    multi = any(len(e["seeds"]) > 1 for e in table.values())

    def fmt(e, key):
        return f"{e[key]:.4f} ± {e[key + '_ci95']:.4f}" if multi else f"{e[key]:.4f}"

    lines = ["| algorithm | mean local test loss | mean global test loss | bytes up | bytes down |",
             "|---|---|---|---|---|"]
    for label, e in table.items():
        lines.append(f"| {label} | {fmt(e, 'mean_local_test_loss')} | {fmt(e, 'mean_global_test_loss')} | "
                     f"{int(e['bytes_up']):,} | {int(e['bytes_down']):,} |")
    seeds = next(iter(table.values()))["seeds"]
    lines.append("")
    lines.append(f"Seeds: {seeds} (each also draws its own data sample)." +
                 (" Mean ± half-width of the 95% t-interval over seeds." if multi else ""))
    if intact is not None:
        lines.append(f"Examples whose prompt (instruction and input) reaches the model whole: {100 * intact:.1f}%.")
    return "\n".join(lines) + "\n"
