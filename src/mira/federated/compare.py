"""``mira compare``: several algorithms on identical data, model and seed(s).

An algorithm spec is a registered name, optionally with options after a colon:
``mira:graph=similarity`` or ``fedprox:mu=0.1``. Options of the config's
``algorithm`` section apply to every algorithm that accepts them.

As an instrument:

* **Everything is checked before the first run** (``check_specs``): every spec's options,
  the config of every (algorithm, seed), and each strategy's ``check_setup`` on the federation
  that seed's data makes (``preflight``: e.g. MIRA's overshoot check on a static graph, which
  needs the number of clients and of local steps).
* **Partial results are visible.** ``comparison.json`` is written before the first run
  (``status: running``, with the config, specs and seeds) and, with ``comparison.md``, again
  after every finished run. ``mira compare --resume OUT`` continues an interrupted
  comparison from it: a run is finished when its ``summary.json`` exists (read back, not
  redone); any other run is resumed from its checkpoint (or from round 0).
* **Paired differences against a baseline** (``baseline``, default ``fedit`` when compared):
  per seed (same data, same model) the difference of each algorithm's mean local and global
  test loss to the baseline's, mean ± 95% t half-width over seeds, and per client (every seed
  and client) whether its local test loss is lower (a win), higher (a loss) or within
  ``TIE`` (a tie) of the baseline's.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mira.config import RunConfig, validate
from mira.errors import MiraError
from mira.federated.engine import Engine, Workspace, strategy_context
from mira.federated.strategies import get_strategy
from mira.io import atomic_write_json, atomic_write_text
from mira.report.progress import NullProgress
from mira.userfiles import parse_yaml

STATE = "comparison.json"
# optimiser settings a spec may set for its own runs (``fedit:federation.lr=0.01``), so that each
# algorithm runs with the learning rate ``mira tune`` chose for it; everything else is shared
FEDERATION_OPTIONS = ("lr", "weight_decay", "grad_clip")
TIE = 1e-3  # |difference in local test loss| below this is a tie
_TOTALS = ("before", "after", "dropped", "input_truncated", "response_truncated", "prompt_intact",
           "prompt_intact_fraction")


LORA_OPTIONS = ("ranks", "rank_by")  # ``lora.<key>`` options a spec may set (the model's slot is shared)


def split_top(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets and braces: ``"a=[1,2],b=3"`` -> ``["a=[1,2]", "b=3"]``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _show(v) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``"mira:graph=similarity,lambda=1"`` -> (label, name, options). ``lora.ranks=[4,8,16]`` and
    ``lora.rank_by=...`` set that run's per-client LoRA ranks (``config_for``)."""
    name, _, rest = spec.strip().partition(":")
    opts = {}
    for item in filter(None, split_top(rest)):
        if "=" not in item:
            raise MiraError(f"algorithm option {item!r} must be key=value", where=f"--algorithms {spec}")
        k, v = item.split("=", 1)
        k = k.strip()
        if k.startswith("federation.") and k[11:] not in FEDERATION_OPTIONS:
            raise MiraError(f"{k} cannot differ between compared algorithms (the federation is shared); only "
                            f"{', '.join('federation.' + o for o in FEDERATION_OPTIONS)} can (each algorithm's tuned "
                            f"optimiser settings)", where=f"--algorithms {spec}")
        if k.startswith("lora.") and k[5:] not in LORA_OPTIONS:
            raise MiraError(f"{k} cannot differ between compared algorithms (they share the model); only "
                            f"{', '.join('lora.' + o for o in LORA_OPTIONS)} can", where=f"--algorithms {spec}")
        opts[k] = parse_yaml(v)
    get_strategy(name)
    label = name if not opts else f"{name}({','.join(f'{k}={_show(v)}' for k, v in opts.items())})"
    return label, name, opts


def config_for(cfg: RunConfig, name: str, opts: dict, seed: int, vary_data: bool = True,
               source: str = "--algorithms") -> RunConfig:
    raw = cfg.model_dump(mode="json")
    cls = get_strategy(name)
    accepted = set(cls.Params.model_fields) | {f.alias for f in cls.Params.model_fields.values() if f.alias}
    base_opts = {k: v for k, v in cfg.algorithm.params().items() if k in accepted}
    lora = {k[5:]: v for k, v in opts.items() if k.startswith("lora.")}
    raw["lora"].update(lora)
    raw["federation"].update({k[11:]: v for k, v in opts.items() if k.startswith("federation.")})
    raw["algorithm"] = {"name": name, **base_opts,
                        **{k: v for k, v in opts.items() if not k.startswith(("lora.", "federation."))}}
    raw["seed"] = seed
    if vary_data:  # each seed also draws its own data sample and split, so the spread covers the data
        raw["data"]["seed"] = cfg.data.seed + seed
    return validate(raw, source)


def default_baseline(labels: list[str], baseline: str | None) -> str | None:
    """``baseline`` if given (it must be one of the compared labels), else ``fedit`` when compared."""
    if baseline is None:
        return "fedit" if "fedit" in labels else None
    if baseline not in labels:
        raise MiraError(f"baseline {baseline!r} is not among the compared algorithms {labels}", where="--baseline")
    return baseline


def preflight(cfgs: list[tuple[str, RunConfig]]) -> None:
    """Each strategy's ``check_setup`` (MIRA's overshoot check, ...) for every ``(where, config)``,
    on the federation that config makes: the records are loaded and partitioned once per data,
    partition and seed (no model is loaded). The training-set sizes are counted before the length
    policy (the engine checks again with the exact ones); a partition that cannot be made (too few
    examples for a test or validation split) is refused here too."""
    from mira.data.partition import partition
    from mira.data.records import load_records
    from mira.privacy.base import check_privacy

    sizes: dict[str, list[int]] = {}
    for where, cfg in cfgs:
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.partition.model_dump(mode="json"), cfg.seed],
                         sort_keys=True)
        if key not in sizes:
            records = load_records(cfg.data, seed=cfg.data.seed)
            sizes[key] = [len(c.train) for c in partition(records, cfg.partition, seed=cfg.seed, min_train=1)]
        cls = get_strategy(cfg.algorithm.name)
        params = cls.parse_params(cfg.algorithm.params())
        try:
            cls.check_setup(params, strategy_context(cfg, sizes[key]))
            check_privacy(cfg, cls, sizes[key])
        except MiraError as e:
            raise MiraError(str(e), where=where) from None


def check_specs(cfg: RunConfig, specs: list[str], seeds: list[int], vary_data: bool = True,
                baseline: str | None = None, setup: bool = True) -> list[tuple]:
    """Parse every spec, validate the config of every (algorithm, seed) and, with ``setup``, run
    every strategy's ``check_setup`` on that seed's federation (``preflight``), before anything runs."""
    parsed = [parse_spec(s) for s in specs]
    labels = [p[0] for p in parsed]
    if len(set(labels)) != len(labels):
        raise MiraError("an algorithm appears twice", where="--algorithms")
    default_baseline(labels, baseline)
    cfgs = []
    for seed in seeds:
        for label, name, opts in parsed:
            cfgs.append((f"--algorithms {label} (seed {seed})", config_for(cfg, name, opts, seed, vary_data)))
    if setup:
        preflight(cfgs)
    return parsed


def _read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def compare(cfg: RunConfig, specs: list[str], out: str | Path, seeds: list[int], progress=None,
            log=lambda s: None, vary_data: bool = True, baseline: str | None = None, resume: bool = False,
            checked: bool = False) -> dict:
    """Run every (seed, algorithm) into ``out``; ``comparison.json``/``.md`` after each run.

    With ``resume``, runs whose ``summary.json`` exists are read back, the others resumed.
    ``checked``: ``check_specs`` already ran (with its preflight) for these arguments."""
    out = Path(out)
    progress = progress or NullProgress()
    parsed = check_specs(cfg, specs, seeds, vary_data, baseline, setup=not checked)
    labels = [p[0] for p in parsed]
    baseline = default_baseline(labels, baseline)
    state = {"status": "running", "specs": list(specs), "seeds": list(seeds), "vary_data": vary_data,
             "baseline": baseline, "config": cfg.model_dump(mode="json")}
    per_seed: dict[str, dict[int, dict]] = {label: {} for label in labels}
    last_rows: dict[str, list[dict]] = {}
    data_per_seed: dict[int, dict] = {}
    total = len(seeds) * len(labels)

    def write(status: str) -> dict:
        result = results(state, labels, seeds, per_seed, data_per_seed, baseline, total, status)
        atomic_write_json(out / STATE, result)
        atomic_write_text(out / "comparison.md", comparison_markdown(result))
        return result

    write("running")
    for seed in seeds:
        seed_cfg = config_for(cfg, parsed[0][1], parsed[0][2], seed, vary_data)
        ws = None  # loaded when the first unfinished run of this seed needs it
        for label, name, opts in parsed:
            run_cfg = config_for(cfg, name, opts, seed, vary_data)
            run_dir = out / (f"seed_{seed}" if len(seeds) > 1 else "") / label
            if resume and (run_dir / "summary.json").exists():
                summary = json.loads((run_dir / "summary.json").read_text())
                rows = _read_rows(run_dir)
                log(f"seed {seed} {label}: finished earlier (read from {run_dir / 'summary.json'})")
            else:
                if ws is None:
                    ws = Workspace.load(seed_cfg, log)
                engine = Engine(ws, run_cfg, run_dir)
                summary = engine.run(resume=resume, progress=progress)
                rows = engine.rows
                glob = summary["mean_global_test_loss"]
                log(f"seed {seed} {label}: local {summary['mean_local_test_loss']:.4f} "
                    f"global {'not computed' if glob is None else f'{glob:.4f}'}")
            per_seed[label][seed] = summary
            last_rows[label] = rows
            if seed not in data_per_seed:
                data = summary.get("data", {})
                data_per_seed[seed] = {"seed": seed, "data_seed": seed_cfg.data.seed,
                                       **{k: data[k] for k in _TOTALS if k in data}}
            write("running")
    result = write("finished")
    if cfg.plots:
        from mira.report.plots import plot_compare

        table = result["algorithms"]
        plot_compare(out, {label: {"summary": {**per_seed[label][seeds[-1]],
                                               "mean_local_test_loss": table[label]["mean_local_test_loss"],
                                               "mean_global_test_loss": table[label].get("mean_global_test_loss")},
                                   "rows": last_rows[label]} for label in labels})
    return result


def results(state: dict, labels: list[str], seeds: list[int], per_seed: dict[str, dict[int, dict]],
            data_per_seed: dict[int, dict], baseline: str | None, total: int, status: str) -> dict:
    """``comparison.json``'s content from the runs finished so far."""
    table = {}
    for label in labels:
        done = [s for s in seeds if s in per_seed[label]]
        if not done:
            continue
        runs = [per_seed[label][s] for s in done]
        entry = {"seeds": done}
        for key in ("mean_local_test_loss", "mean_global_test_loss", "mean_val_loss", "graph_auc_last", "bytes_up",
                    "bytes_down", "wall_time_s", "mean_rouge_l", "mean_exact_match"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            if vals and len(vals) == len(runs):
                entry[key] = float(np.mean(vals))
                entry[f"{key}_std"] = float(np.std(vals))
                entry[f"{key}_ci95"] = ci95(vals)
        entry["per_seed"] = [{"seed": s, "mean_local_test_loss": r["mean_local_test_loss"],
                              "mean_global_test_loss": r["mean_global_test_loss"],
                              **({"mean_val_loss": r["mean_val_loss"]} if "mean_val_loss" in r else {})}
                             for s, r in zip(done, runs)]
        table[label] = entry
    data = [data_per_seed[s] for s in seeds if s in data_per_seed]
    intact = [d["prompt_intact_fraction"] for d in data if "prompt_intact_fraction" in d]
    finished = sum(len(v) for v in per_seed.values())
    return {**state, "status": status, "finished_runs": finished, "total_runs": total, "data": data,
            "prompt_intact_fraction": float(np.mean(intact)) if intact else None, "algorithms": table,
            "paired": paired_vs_baseline(per_seed, labels, seeds, baseline) if baseline else None}


def paired_vs_baseline(per_seed: dict[str, dict[int, dict]], labels: list[str], seeds: list[int],
                       baseline: str) -> dict:
    """Per algorithm: per-seed differences to ``baseline`` (mean ± 95% t half-width) of the mean local
    and global test loss, and per-client wins/ties/losses on local test loss (tie: ``|diff| < TIE``)."""
    out = {"baseline": baseline, "tie": TIE, "algorithms": {}}
    base = per_seed.get(baseline, {})
    for label in labels:
        if label == baseline:
            continue
        both = [s for s in seeds if s in per_seed[label] and s in base]
        if not both:
            continue
        entry = {"seeds": both}
        for key, name in (("mean_local_test_loss", "local"), ("mean_global_test_loss", "global")):
            if any(per_seed[label][s].get(key) is None or base[s].get(key) is None for s in both):
                continue  # not computed (eval.global_loss: never)
            diffs = [per_seed[label][s][key] - base[s][key] for s in both]
            entry[name] = {"mean": float(np.mean(diffs)), "ci95": ci95(diffs), "per_seed": diffs}
        wins = ties = losses = 0
        for s in both:
            theirs = {c["id"]: c["local_test_loss"] for c in base[s]["clients"]}
            for c in per_seed[label][s]["clients"]:
                if c["id"] not in theirs:
                    continue
                d = c["local_test_loss"] - theirs[c["id"]]
                if abs(d) < TIE:
                    ties += 1
                elif d < 0:
                    wins += 1
                else:
                    losses += 1
        entry["clients"] = {"wins": wins, "ties": ties, "losses": losses}
        out["algorithms"][label] = entry
    return out


def ci95(vals) -> float:
    """Half-width of the 95% Student-t confidence interval of the mean (0 for one value)."""
    if len(vals) < 2:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / np.sqrt(len(vals)))


def markdown_table(table: dict, intact: float | None = None) -> str:
    if not table:
        return "No run has finished yet.\n"
    multi = any(len(e["seeds"]) > 1 for e in table.values())

    def fmt(e, key):
        if key not in e:
            return "–"
        return f"{e[key]:.4f} ± {e[key + '_ci95']:.4f}" if multi else f"{e[key]:.4f}"

    extra = [(k, title) for k, title in (("mean_val_loss", "mean val loss"), ("graph_auc_last", "graph AUC (last round)"))
             if any(k in e for e in table.values())]
    lines = ["| algorithm | mean local test loss | mean global test loss | " + "".join(f"{t} | " for _, t in extra)
             + "bytes up | bytes down |", "|---|---|---|" + "---|" * len(extra) + "---|---|"]
    for label, e in table.items():
        lines.append(f"| {label} | {fmt(e, 'mean_local_test_loss')} | {fmt(e, 'mean_global_test_loss')} | "
                     + "".join(f"{fmt(e, k)} | " for k, _ in extra)
                     + f"{int(e['bytes_up']):,} | {int(e['bytes_down']):,} |")
    seeds = sorted({s for e in table.values() for s in e["seeds"]})
    lines.append("")
    lines.append(f"Seeds: {seeds} (each also draws its own data sample)." +
                 (" Mean ± half-width of the 95% t-interval over seeds." if multi else ""))
    if intact is not None:
        lines.append(f"Examples whose prompt (instruction and input) reaches the model whole: {100 * intact:.1f}%.")
    return "\n".join(lines) + "\n"


def paired_markdown(paired: dict | None) -> str:
    if not paired or not paired["algorithms"]:
        return ""
    b, tie = paired["baseline"], paired["tie"]
    lines = [f"## Paired differences vs {b}", "",
             f"Per seed (same data, same model): algorithm − {b}; mean ± half-width of the 95% t-interval over the "
             f"seeds (± 0 with one seed); negative = lower loss than {b}. Clients: over every seed and client, the "
             f"algorithm's local test loss is lower (better), within {tie:g} (tie: |difference| < {tie:g}) or higher "
             f"(worse) than {b}'s.", "",
             "| algorithm | seeds | Δ mean local test loss | Δ mean global test loss | clients better / tied / worse |",
             "|---|---|---|---|---|"]
    for label, e in paired["algorithms"].items():
        c = e["clients"]
        lines.append(f"| {label} | {len(e['seeds'])} | {e['local']['mean']:+.4f} ± {e['local']['ci95']:.4f} | "
                     + (f"{e['global']['mean']:+.4f} ± {e['global']['ci95']:.4f} | " if "global" in e else "– | ")
                     + f"{c['wins']} / {c['ties']} / {c['losses']} |")
    return "\n".join(lines) + "\n"


def comparison_markdown(result: dict) -> str:
    """``comparison.md``: the table, the paired differences vs the baseline, and the progress."""
    text = markdown_table(result["algorithms"], result.get("prompt_intact_fraction"))
    if result.get("status") != "finished":
        text += (f"\n**Partial: {result['finished_runs']} of {result['total_runs']} runs finished** "
                 f"(`mira compare --resume DIR` continues an interrupted comparison).\n")
    paired = paired_markdown(result.get("paired"))
    return text + ("\n" + paired if paired else "")
