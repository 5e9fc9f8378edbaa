"""One-shot federated LoRA against multi-round ``fedit`` with the same total local steps, at three model sizes.

The claim tested (Wang et al., "One Communication Round is All It Needs"): the global-test
gap between one-shot and multi-round FedAvg-style LoRA shrinks as models grow.

Setting: ``examples/dolly.yaml`` (Dolly-15k, 8 clients, one category each, 125 examples per
category, 25 test examples per client, max_length 96, LoRA r 8 / alpha 16, batch 8, lr 3e-3),
with fewer rounds/steps to fit a 1-core CPU budget (default rounds 4 x local_steps 1; oneshot
trains 4 steps per client and uploads once), evaluated only at the end. Models:

* ``stories260K``: the real pre-trained Llama (260,032 parameters) from ``--assets``;
* ``x4`` and ``x16``: Llamas built by ``mira.models.zoo`` with stories260K's tokenizer, ~4x and
  ~16x the parameters, pre-trained briefly on TinyStories (cached under ``--cache``);
* ``x1``: stories260K's architecture pre-trained with that same brief recipe (a control).

For each model and seed both algorithms run on the same workspace (same partition, same
initial adapter). Recorded: mean global and local test loss, the base model's global test
loss (the initial adapter: LoRA B = 0), the gap (oneshot - fedit), the gap relative to
fedit's improvement over the base, and the communication ratio (fedit bytes / oneshot bytes,
up + down).

    MIRA_THREADS=1 python benchmarks/oneshot_experiment.py --assets /work/shared --seeds 0,1,2 --test-size 20

See docs/oneshot.md for the results.

Results: ``benchmarks/results/oneshot.json`` (written after every run, so a cut-off run keeps
what it finished); a table is printed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("MIRA_THREADS", "1")

import numpy as np
import torch
import yaml

torch.set_num_threads(int(os.environ["MIRA_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "oneshot.json"
# brief pre-training of the zoo models (batch 8 x 128 tokens of TinyStories; capped by --pretrain-seconds)
PRETRAIN = {"x1": {"steps": 300}, "x4": {"steps": 160}, "x16": {"steps": 80}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_path(name: str, args) -> tuple[str, dict]:
    assets = Path(args.assets)
    if name == "stories260K":
        return str(assets / "models" / "stories260K"), {"parameters": 260_032, "pretrain": "llama2.c checkpoint"}
    from mira.models.zoo import ensure_zoo_model

    out = ensure_zoo_model(name, assets / "models" / "stories260K", assets / "data" / "tinystories" / "tinystories_val.txt",
                           args.cache, steps=PRETRAIN[name]["steps"], seq_len=128, batch_size=8, lr=3e-3,
                           max_seconds=args.pretrain_seconds, log=log)
    return str(out), json.loads((out / "zoo.json").read_text())


def base_config(args, path: str, seed: int) -> dict:
    raw = yaml.safe_load((ROOT / "examples" / "dolly.yaml").read_text())
    raw["seed"] = seed
    raw["model"]["path"] = path
    raw["data"]["path"] = str(Path(args.assets) / "data" / "dolly-15k" / "databricks-dolly-15k.jsonl")
    raw["federation"].update(rounds=args.rounds, local_steps=args.local_steps)
    if args.test_size is not None:
        raw["partition"]["test_size"] = args.test_size
    raw["eval"] = {"every": 10_000}  # only at the end
    raw["plots"] = False
    return raw


def summarise(runs: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for m in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == m]
        agg = {"seeds": [r["seed"] for r in rs], "parameters": rs[0]["parameters"]}
        for k in ("base_global", "fedit_global", "oneshot_global", "fedit_local", "oneshot_local", "gap_global",
                  "gap_local", "rel_gap_global", "comm_ratio", "fedit_wall_s", "oneshot_wall_s"):
            v = np.array([r[k] for r in rs], dtype=float)
            agg[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        out[m] = agg
    return out


def table(summary: dict) -> str:
    def f(a, d=3):
        return f"{a['mean']:.{d}f} ± {a['std']:.{d}f}"

    head = ("| model | params | seeds | base global | fedit global | oneshot global | gap (one-fed) | "
            "rel. gap | fedit local | oneshot local | comm ratio |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, a in summary.items():
        lines.append(f"| {m} | {a['parameters']:,} | {len(a['seeds'])} | {f(a['base_global'])} | {f(a['fedit_global'])} | "
                     f"{f(a['oneshot_global'])} | {f(a['gap_global'])} | {f(a['rel_gap_global'], 2)} | "
                     f"{f(a['fedit_local'])} | {f(a['oneshot_local'])} | {a['comm_ratio']['mean']:.1f} |")
    return "\n".join(lines)


def combine(files: list[str], out: str) -> int:
    parts = [json.loads(Path(f).read_text()) for f in files]
    runs = [r for part in parts for r in part["runs"]]
    models: dict = {}
    for part in parts:
        models.update(part["models"])
    merged = {**{k: v for k, v in parts[0].items() if k not in ("runs", "summary", "models", "command", "wall_s")},
              "models": models, "parts": [{"file": f, "command": part["command"], "wall_s": part["wall_s"],
                                           "seeds": part["seeds"]} for f, part in zip(files, parts)],
              "runs": runs, "summary": summarise(runs)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(merged, indent=2))
    print(table(merged["summary"]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.environ.get("MIRA_ASSETS"), help="folder with data/ and models/ (or MIRA_ASSETS)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--models", default="stories260K,x1,x4,x16")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--test-size", type=int, default=None, help="test examples per client (dolly.yaml: 25)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "oneshot_experiment"), help="engine run folders (scratch)")
    p.add_argument("--cache", default=None, help="zoo model cache (default $MIRA_CACHE/zoo or ~/.cache/mira/zoo)")
    p.add_argument("--pretrain-seconds", type=float, default=220.0, help="cap on each zoo model's pre-training")
    p.add_argument("--combine", default=None,
                   help="comma-separated result files of earlier invocations (e.g. one per model, run side by side): "
                        "merge their runs into --out and print the table; runs nothing")
    args = p.parse_args(argv)
    if args.combine:
        return combine(args.combine.split(","), args.out)
    if not args.assets:
        p.error("--assets (or MIRA_ASSETS) is required")
    from mira.config import validate
    from mira.eval.metrics import eval_loss
    from mira.federated.engine import Engine, Workspace
    from mira.models.demo import cache_dir
    from mira.models.loader import quiet_transformers

    quiet_transformers()
    args.cache = Path(args.cache) if args.cache else cache_dir() / "zoo"
    seeds = [int(s) for s in args.seeds.split(",")]
    models = args.models.split(",")
    t_all = time.perf_counter()
    paths, infos = {}, {}
    for m in models:
        t0 = time.perf_counter()
        paths[m], infos[m] = model_path(m, args)
        log(f"model {m}: {paths[m]} ({time.perf_counter() - t0:.0f}s)")
    runs: list[dict] = []
    meta = {"setting": {"config": "examples/dolly.yaml", "rounds": args.rounds, "local_steps": args.local_steps,
                        "test_size": args.test_size or 25,
                        "total_local_steps_per_client": args.rounds * args.local_steps, "eval": "end only"},
            "models": infos, "seeds": seeds, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/oneshot_experiment.py", *(argv or sys.argv[1:])])}
    for seed in seeds:  # seed-major: a cut-off run still has every model for the seeds it finished
        for m in models:
            raw = base_config(args, paths[m], seed)
            cfg = validate(copy.deepcopy(raw))
            ws = Workspace.load(cfg)
            ws.slot.set(ws.slot.initial_state)
            base_global = eval_loss(ws.model, ws.global_test, ws.tokenizer.pad_token_id, cfg.eval.batch_size)[0]
            res = {}
            for algo in ("fedit", "oneshot"):
                r = copy.deepcopy(raw)
                r["algorithm"] = {"name": algo}
                c = validate(r)
                t0 = time.perf_counter()
                res[algo] = Engine(ws, c, Path(args.workdir) / m / f"seed{seed}" / algo, quiet=True).run()
                res[algo]["_wall"] = time.perf_counter() - t0
            fe, on = res["fedit"], res["oneshot"]
            assert fe["train_steps"] == on["train_steps"], (fe["train_steps"], on["train_steps"])
            gain = base_global - fe["mean_global_test_loss"]
            row = {"model": m, "seed": seed, "parameters": infos[m]["parameters"], "base_global": base_global,
                   "fedit_global": fe["mean_global_test_loss"], "oneshot_global": on["mean_global_test_loss"],
                   "fedit_local": fe["mean_local_test_loss"], "oneshot_local": on["mean_local_test_loss"],
                   "gap_global": on["mean_global_test_loss"] - fe["mean_global_test_loss"],
                   "gap_local": on["mean_local_test_loss"] - fe["mean_local_test_loss"],
                   "rel_gap_global": (on["mean_global_test_loss"] - fe["mean_global_test_loss"]) / gain if gain else float("nan"),
                   "fedit_bytes": fe["bytes_up"] + fe["bytes_down"], "oneshot_bytes": on["bytes_up"] + on["bytes_down"],
                   "comm_ratio": (fe["bytes_up"] + fe["bytes_down"]) / (on["bytes_up"] + on["bytes_down"]),
                   "adapter_bytes": fe["adapter_bytes"], "train_steps": fe["train_steps"],
                   "fedit_wall_s": fe["_wall"], "oneshot_wall_s": on["_wall"]}
            runs.append(row)
            log(f"{m} seed {seed}: base {base_global:.3f}  fedit {row['fedit_global']:.3f}  oneshot "
                f"{row['oneshot_global']:.3f}  gap {row['gap_global']:+.4f}  comm x{row['comm_ratio']:.1f}  "
                f"({fe['_wall']:.0f}s + {on['_wall']:.0f}s)")
            out = {**meta, "runs": runs, "summary": summarise(runs), "wall_s": time.perf_counter() - t_all}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out).with_suffix(".json.tmp")
            tmp.write_text(json.dumps(out, indent=2))
            os.replace(tmp, args.out)
    print(table(summarise(runs)))
    log(f"done in {time.perf_counter() - t_all:.0f}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
