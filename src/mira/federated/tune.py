"""``mira tune``: pick hyper-parameters on a validation split, never on test data.

``mira tune CONFIG --algorithm mira --grid 'federation.lr=[1e-3,3e-3,1e-2]' --grid 'algorithm.lambda=[0.5,2,8]'
--seeds 0 --out DIR`` runs the Cartesian product of the grids (every point with every seed,
each seed also drawing its own data sample as in ``mira compare``) and chooses the point with
the lowest **mean validation loss** (each client's own adapter on its own validation split,
averaged over clients, then over seeds; ties go to the earlier point).

* A validation split is required: it is carved from each client's training data
  (``partition.val_fraction``; a config without one gets 0.2, and the log says so). The test
  splits are the same as without it; their losses are recorded in ``tune.json`` for reference
  but play no part in the choice.
* Every point is validated before anything runs: its config, the algorithm's options and the
  strategy's ``check_setup`` on that seed's federation (e.g. MIRA's overshoot check).
* ``tune.json``: the grid, every point (params, val loss per seed and mean, the test losses
  marked ``not_used_for_selection``, run folders) and the choice, with the ``--set`` overrides to
  paste into ``mira compare``; ``tune.md``: the same as a table. Run folders:
  ``point_NN/`` (``point_NN/seed_S/`` with several seeds).

The choice is made with the validation split carved out of the training data; ``mira
compare`` with the printed overrides trains on all of it unless ``partition.val_fraction`` is
set there too.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path

import numpy as np
import yaml

from mira.config import RunConfig, validate
from mira.errors import MiraError
from mira.federated.compare import ci95, config_for, parse_spec, preflight
from mira.io import atomic_write_json, atomic_write_text
from mira.report.progress import NullProgress
from mira.userfiles import parse_yaml

DEFAULT_VAL_FRACTION = 0.2
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_FORBIDDEN = {"seed", "algorithm.name"}


def _number(v):
    """YAML 1.1 reads ``1e-3`` as a string; a grid value that looks like a number is one."""
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        f = float(v)
        return int(f) if f.is_integer() and not any(c in v for c in ".eE") else f
    return v


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """``["federation.lr=[1e-3,3e-3]", "algorithm.lambda=2"]`` -> ``[(key, values), ...]``."""
    if not items:
        raise MiraError("give at least one --grid KEY=[v1,v2,...]", where="--grid")
    grid: list[tuple[str, list]] = []
    for item in items:
        if "=" not in item:
            raise MiraError(f"--grid expects KEY=[v1,v2,...], got {item!r}", where="--grid")
        key, text = (x.strip() for x in item.split("=", 1))
        if not key or key in _FORBIDDEN:
            raise MiraError(f"cannot tune {key!r} (seeds come from --seeds, the algorithm from --algorithm)",
                            where="--grid")
        if any(key == k for k, _ in grid):
            raise MiraError(f"{key} appears twice", where="--grid")
        try:
            values = parse_yaml(text)
        except yaml.YAMLError:
            raise MiraError(f"cannot read the values of {key}: {text!r}", where="--grid") from None
        values = values if isinstance(values, list) else [values]
        if not values:
            raise MiraError(f"{key} has no value", where="--grid")
        values = [_number(v) for v in values]
        if len({json.dumps(v) for v in values}) != len(values):
            raise MiraError(f"{key} lists a value twice", where="--grid")
        grid.append((key, values))
    return grid


def grid_points(grid: list[tuple[str, list]]) -> list[dict]:
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in grid])]


def _set(raw: dict, dotted: str, value) -> None:
    node = raw
    *path, last = dotted.split(".")
    for p in path:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise MiraError(f"cannot set {dotted}: {p} is not a section", where="--grid")
    node[last] = value


def point_config(cfg: RunConfig, name: str, opts: dict, point: dict, seed: int, vary_data: bool = True) -> RunConfig:
    """The run config of one grid point and seed: ``algorithm.*`` keys become options of the tuned
    algorithm (so an option it does not accept is an error), any other key sets that config field."""
    raw = cfg.model_dump(mode="json")
    algo = dict(opts)
    for key, value in point.items():
        if key.startswith("algorithm."):
            algo[key[len("algorithm."):]] = value
        else:
            _set(raw, key, copy.deepcopy(value))
    return config_for(validate(raw, "--grid"), name, algo, seed, vary_data, source="--grid")


def set_value(v) -> str:
    """A value as ``--set`` reads it back."""
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v)


def overrides(point: dict, name: str, cfg: RunConfig) -> list[str]:
    """The ``--set`` overrides for ``point`` (``algorithm.name`` too when the config names another
    algorithm: its section must accept the options)."""
    sets = [f"{k}={set_value(v)}" for k, v in point.items()]
    if any(k.startswith("algorithm.") for k in point) and cfg.algorithm.name != name:
        sets.insert(0, f"algorithm.name={name}")
    return sets


def _workspace_key(cfg: RunConfig) -> str:
    d = cfg.model_dump(mode="json")
    return json.dumps({k: d.get(k) for k in ("seed", "model", "lora", "data", "partition", "refine")}, sort_keys=True)


def tune(cfg: RunConfig, algorithm: str, grid_items: list[str], seeds: list[int], out: str | Path, progress=None,
         log=lambda s: None, vary_data: bool = True) -> dict:
    from mira.federated.engine import Engine, Workspace

    out = Path(out)
    progress = progress or NullProgress()
    label, name, opts = parse_spec(algorithm)
    grid = parse_grid(grid_items)
    notes = []
    if cfg.partition.val_fraction <= 0 and "partition.val_fraction" not in dict(grid):
        raw = cfg.model_dump(mode="json")
        raw["partition"]["val_fraction"] = DEFAULT_VAL_FRACTION
        cfg = validate(raw)
        notes.append(f"the config has no validation split: partition.val_fraction set to {DEFAULT_VAL_FRACTION} "
                     f"(carved from each client's training data; the test splits are unchanged)")
        log(notes[-1])
    points = grid_points(grid)
    cfgs = {}
    for i, point in enumerate(points):
        for seed in seeds:
            c = point_config(cfg, name, opts, point, seed, vary_data)
            if c.partition.val_fraction <= 0:
                raise MiraError(f"point {i} ({point}) has no validation split (partition.val_fraction = 0); "
                                f"tune selects on validation loss only", where="--grid")
            cfgs[i, seed] = c
    preflight([(f"--grid point {i} {point} (seed {seed})", cfgs[i, seed])
               for i, point in enumerate(points) for seed in seeds])

    entries = [{"index": i, "params": point, "runs": {}, "val_loss": {}, "test_not_used_for_selection": {}}
               for i, point in enumerate(points)]
    state = {"status": "running", "algorithm": label, "grid": {k: v for k, v in grid}, "seeds": list(seeds),
             "vary_data": vary_data, "val_fraction": cfg.partition.val_fraction, "notes": notes,
             "selection": "lowest mean validation loss (mean over clients of each client's own adapter on its own "
                          "validation split, then mean over seeds); test losses are recorded, not used",
             "config": cfg.model_dump(mode="json")}

    def write(status: str) -> dict:
        result = tune_result(state, entries, seeds, name, cfg, status)
        atomic_write_json(out / "tune.json", result)
        atomic_write_text(out / "tune.md", tune_markdown(result))
        return result

    write("running")
    ws, ws_key = None, None
    for seed in seeds:
        for i, point in enumerate(points):
            run_cfg = cfgs[i, seed]
            key = _workspace_key(run_cfg)
            if key != ws_key:
                ws, ws_key = None, None  # free the old one first
                ws, ws_key = Workspace.load(run_cfg, log), key
            run_dir = out / f"point_{i:02d}" / (f"seed_{seed}" if len(seeds) > 1 else "")
            summary = Engine(ws, run_cfg, run_dir).run(progress=progress)
            e = entries[i]
            e["runs"][str(seed)] = str(run_dir.relative_to(out))
            e["val_loss"][str(seed)] = summary["mean_val_loss"]
            e["test_not_used_for_selection"][str(seed)] = {k: summary[k] for k in
                                                            ("mean_local_test_loss", "mean_global_test_loss")}
            log(f"seed {seed} point {i} {point}: mean val loss {summary['mean_val_loss']:.4f}")
            write("running")
    return write("finished")


def tune_result(state: dict, entries: list[dict], seeds: list[int], name: str, cfg: RunConfig, status: str) -> dict:
    points = []
    for e in entries:
        vals = [e["val_loss"][str(s)] for s in seeds if str(s) in e["val_loss"]]
        p = {**e, "mean_val_loss": float(np.mean(vals)) if vals else None, "val_loss_ci95": ci95(vals) if vals else None}
        points.append(p)
    complete = [p for p in points if len(p["val_loss"]) == len(seeds)]
    best = None
    if complete:
        b = min(complete, key=lambda p: (p["mean_val_loss"], p["index"]))  # ties: the earlier point
        sets = overrides(b["params"], name, cfg)
        best = {"index": b["index"], "params": b["params"], "mean_val_loss": b["mean_val_loss"], "set": sets,
                "command_line": " ".join(f"--set {s}" for s in sets)}
    return {**state, "status": status, "points": points, "best": best}


def tune_markdown(result: dict) -> str:
    keys = list(result["grid"])
    seeds = result["seeds"]
    lines = [f"# mira tune: {result['algorithm']}", "",
             f"Selection: {result['selection']}. Seeds {seeds}; validation split: "
             f"partition.val_fraction = {result['val_fraction']}.", ""]
    lines += [f"Note: {n}." for n in result["notes"]]
    if result["notes"]:
        lines.append("")
    head = "| point | " + " | ".join(keys) + " | mean val loss | " + " | ".join(f"val (seed {s})" for s in seeds) + \
        " | mean local test loss (not used) | mean global test loss (not used) |"
    lines += [head, "|" + "---|" * (1 + len(keys) + 1 + len(seeds) + 2)]
    best = result["best"]["index"] if result["best"] else None
    for p in result["points"]:
        mark = " **(chosen)**" if p["index"] == best else ""
        mv = "–" if p["mean_val_loss"] is None else (
            f"{p['mean_val_loss']:.4f}" + (f" ± {p['val_loss_ci95']:.4f}" if len(p["val_loss"]) > 1 else ""))
        per = [f"{p['val_loss'][str(s)]:.4f}" if str(s) in p["val_loss"] else "–" for s in seeds]
        tests = list(p["test_not_used_for_selection"].values())
        lt = f"{np.mean([t['mean_local_test_loss'] for t in tests]):.4f}" if tests else "–"
        gt = (f"{np.mean([t['mean_global_test_loss'] for t in tests]):.4f}"
              if tests and all(t["mean_global_test_loss"] is not None for t in tests) else "–")
        lines.append(f"| {p['index']}{mark} | " + " | ".join(set_value(p["params"][k]) for k in keys) +
                     f" | {mv} | " + " | ".join(per) + f" | {lt} | {gt} |")
    lines.append("")
    if result["status"] != "finished":
        lines.append(f"**Partial**: {sum(len(p['val_loss']) for p in result['points'])} of "
                     f"{len(result['points']) * len(seeds)} runs finished.")
    if result["best"]:
        lines.append(f"Chosen: point {best}, `{result['best']['command_line']}` (paste into `mira compare`; it "
                     f"trains on all the training data unless `--set partition.val_fraction="
                     f"{result['val_fraction']}` is given too).")
    return "\n".join(lines) + "\n"
