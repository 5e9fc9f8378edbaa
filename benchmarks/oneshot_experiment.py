"""Does the gap between one-shot and multi-round federated LoRA shrink as the model grows?

The claim tested (Wang et al., "One Communication Round is All It Needs"): with the same total
local steps, the global-test gap between one-shot federated LoRA (``oneshot``: every client trains
its whole budget from the same initial adapter, uploads once, the server merges once) and
multi-round FedAvg-style LoRA (``fedit``) shrinks as models grow.

The size ladder (``--models``), one tokenizer family whose quality improves with size:

* ``x1``, ``x4``, ``x16``, ``x64``: Llamas of width 64 / 128 / 256 / 512 (0.26M-14.8M
  parameters) built by ``mira.models.zoo`` with stories260K's tokenizer, all pre-trained with the
  same recipe and the **same number of tokens** (``--pretrain-steps`` x batch 8 x 128 tokens of
  TinyStories, ~1.6 passes over it), so that size, not pre-training, is what changes; the peak
  learning rate is 3e-3 up to width 128 and scales as 1/width above (``pretrain_lr``);
* ``stories260K``: the real llama2.c checkpoint (x1's architecture, pre-trained far longer);
* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (134.5M), the top rung: another tokenizer,
  the chat template and real instruction tuning, so it is a point of its own, not part of the
  zoo's controlled ladder.

Each model's language-modelling quality is measured the same way for all: nats per character on
the last 20,000 characters of TinyStories (text none of the zoo models trained on).

Setting: ``examples/dolly.yaml`` (Dolly-15k, 5 clients, one category each, 125 records per
category; 20 test records per client and 20% of each client's training records held out for
validation), ``--rounds`` x ``--local-steps`` (default 4 x 5: 20 local steps per client, batch
4), evaluation at the end. The learning rate of each (model, algorithm) is chosen on the
**validation** split (mean validation loss, seed ``--tune-seed``) from ``--lr-grid``
(``--smol-lr-grid`` for SmolLM2); the test split is never used to choose. Then every seed
(``--seeds``, which also change the data sample: ``data.seed``) runs both algorithms on the same
workspace (same partition, same initial adapter).

Recorded per run: global and local test loss of ``fedit`` and ``oneshot``, the base model's
(LoRA B = 0) global test loss, gap = oneshot - fedit, relative gap = gap / (base - fedit), bytes.

    MIRA_THREADS=1 python benchmarks/oneshot_experiment.py --assets ../shared --models x1,x4,x16,x64,stories260K
    MIRA_THREADS=2 python benchmarks/oneshot_experiment.py --assets ../shared --models smollm2-135m-instruct \\
        --out benchmarks/results/oneshot_smollm2.json
    python benchmarks/oneshot_experiment.py --combine A.json,B.json --out benchmarks/results/oneshot.json
    python benchmarks/oneshot_experiment.py --plot benchmarks/results/oneshot.json   # docs/img/oneshot_gap.png

Results are written after every run (atomically), so a cut-off run keeps what it finished and a
rerun with the same ``--out`` skips what is already there. See docs/oneshot.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("MIRA_THREADS", "1")

import numpy as np
import torch
import yaml

from mira.io import atomic_write_json

torch.set_num_threads(int(os.environ["MIRA_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "oneshot.json"
PLOT = ROOT / "docs" / "img" / "oneshot_gap.png"
SMOL = "smollm2-135m-instruct"
ZOO_MODELS = ("x1", "x4", "x16", "x64")
HELD_OUT_CHARS = 20_000


def pretrain_lr(name: str) -> float:
    """3e-3 up to width 128, then scaled as 1/width (as muP scales Adam's step for hidden weights): at 3e-3
    the 256- and 512-wide models pre-trained worse than the 128-wide one (held-out 2.63 / 2.66 vs 2.34)."""
    from mira.models.zoo import ZOO

    return 3e-3 * min(1.0, 128 / ZOO[name].get("hidden_size", 64))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_path(name: str, args) -> tuple[str, dict]:
    assets = Path(args.assets)
    if name == "stories260K":
        return str(assets / "models" / "stories260K"), {"parameters": 260_032, "pretrain": "llama2.c checkpoint"}
    if name == SMOL:
        from mira.models.loader import resolve_model_path

        return resolve_model_path(SMOL), {"parameters": 134_515_008, "pretrain": "SmolLM2-135M-Instruct (HF)"}
    if name not in ZOO_MODELS:
        raise SystemExit(f"error: unknown model {name!r} (known: stories260K, {', '.join(ZOO_MODELS)}, {SMOL})")
    from mira.models.zoo import ensure_zoo_model

    out = ensure_zoo_model(name, assets / "models" / "stories260K", assets / "data" / "tinystories" / "tinystories_val.txt",
                           args.cache, steps=args.pretrain_steps, seq_len=128, batch_size=8, lr=pretrain_lr(name),
                           max_seconds=None, log=log)
    return str(out), json.loads((out / "zoo.json").read_text())


@torch.no_grad()
def nats_per_char(path: str, corpus: Path) -> float:
    """Mean NLL per character of the last ``HELD_OUT_CHARS`` characters of ``corpus`` (128-token windows)."""
    from mira.models.loader import load_base

    text = corpus.read_text(encoding="utf-8")[-HELD_OUT_CHARS:]
    text = text[text.index("\n\n") + 2:]  # start at a story boundary
    model, tok = load_base(path)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    total = 0.0
    for i in range(0, len(ids) - 1, 127):
        x = torch.tensor([ids[i:i + 128]])
        if x.shape[1] < 2:
            break
        total += float(model(input_ids=x, labels=x).loss) * (x.shape[1] - 1)
    return total / len(text)


def base_config(args, model: str, path: str, seed: int, algo: str, lr: float) -> dict:
    raw = yaml.safe_load((ROOT / "examples" / "dolly.yaml").read_text())
    raw["seed"] = seed
    raw["model"]["path"] = path
    raw["data"]["path"] = str(Path(args.assets) / "data" / "dolly-15k" / "databricks-dolly-15k.jsonl")
    if model == SMOL:
        raw["data"]["template"] = "chat"  # its own chat template (auto would pick it too)
    raw["partition"].update(test_size=args.test_size, val_fraction=args.val_fraction)
    raw["federation"].update(rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size, lr=lr)
    raw["algorithm"] = {"name": algo}
    raw["eval"] = {"every": 10_000, "global_loss": "final"}  # only at the end
    raw["plots"] = False
    return raw


def run_one(args, model: str, path: str, seed: int, algo: str, lr: float, ws_cache: dict, tag: str) -> dict:
    from mira.config import validate
    from mira.eval.metrics import eval_loss
    from mira.federated.engine import Engine, Workspace

    cfg = validate(base_config(args, model, path, seed, algo, lr))
    key = (model, seed)
    if key not in ws_cache:
        ws_cache.clear()  # one model in memory at a time
        ws = Workspace.load(cfg)
        ws.slot.set(ws.slot.initial_state)
        base = eval_loss(ws.model, ws.global_test, ws.tokenizer.pad_token_id, cfg.eval.batch_size)[0]
        ws_cache[key] = (ws, base)
    ws, base = ws_cache[key]
    t0 = time.perf_counter()
    res = Engine(ws, cfg, Path(args.workdir) / model / tag / f"seed{seed}" / f"{algo}_lr{lr:g}", quiet=True).run()
    return {"model": model, "seed": seed, "algorithm": algo, "lr": lr, "base_global": base,
            "global": res["mean_global_test_loss"], "local": res["mean_local_test_loss"],
            "val": res.get("mean_val_loss"), "bytes": res["bytes_up"] + res["bytes_down"],
            "train_steps": res["train_steps"], "train_tokens": res["train_tokens"],
            "wall_s": time.perf_counter() - t0}


def pairs(runs: list[dict], tuned: dict) -> list[dict]:
    """One row per (model, seed) with both algorithms at their tuned learning rates."""
    by = {}
    for r in runs:
        if r["phase"] == "test" and math.isclose(r["lr"], tuned.get(f"{r['model']}/{r['algorithm']}", {}).get("lr", r["lr"])):
            by.setdefault((r["model"], r["seed"]), {})[r["algorithm"]] = r
    rows = []
    for (m, s), d in by.items():
        if "fedit" in d and "oneshot" in d:
            fe, on = d["fedit"], d["oneshot"]
            gain = fe["base_global"] - fe["global"]
            rows.append({"model": m, "seed": s, "base_global": fe["base_global"], "fedit_global": fe["global"],
                         "oneshot_global": on["global"], "fedit_local": fe["local"], "oneshot_local": on["local"],
                         "gap_global": on["global"] - fe["global"], "gap_local": on["local"] - fe["local"],
                         "rel_gap_global": (on["global"] - fe["global"]) / gain if gain > 0 else float("nan"),
                         "comm_ratio": fe["bytes"] / on["bytes"], "fedit_lr": fe["lr"], "oneshot_lr": on["lr"]})
    return rows


def summarise(runs: list[dict], models: dict, tuned: dict) -> dict:
    from mira.federated.compare import ci95

    out = {}
    rows = pairs(runs, tuned)
    for m in dict.fromkeys(r["model"] for r in rows):
        rs = sorted((r for r in rows if r["model"] == m), key=lambda r: r["seed"])
        agg = {"seeds": [r["seed"] for r in rs], "parameters": models[m]["parameters"],
               "nats_per_char": models[m].get("nats_per_char"), "fedit_lr": rs[0]["fedit_lr"],
               "oneshot_lr": rs[0]["oneshot_lr"]}
        for k in ("base_global", "fedit_global", "oneshot_global", "fedit_local", "oneshot_local", "gap_global",
                  "gap_local", "rel_gap_global", "comm_ratio"):
            v = [r[k] for r in rs]
            agg[k] = {"mean": float(np.mean(v)), "ci95": ci95(v), "values": v}
        out[m] = agg
    return out


def table(summary: dict) -> str:
    def f(a, d=3):
        return f"{a['mean']:.{d}f} ± {a['ci95']:.{d}f}"

    lines = ["| model | params | nats/char | seeds | lr fedit / oneshot | base global | fedit global | oneshot global | "
             "gap (one − fed) | rel. gap | fedit local | oneshot local | comm ratio |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, a in sorted(summary.items(), key=lambda kv: kv[1]["parameters"]):
        npc = f"{a['nats_per_char']:.3f}" if a.get("nats_per_char") is not None else "–"
        lines.append(f"| {m} | {a['parameters']:,} | {npc} | {len(a['seeds'])} | {a['fedit_lr']:g} / {a['oneshot_lr']:g} | "
                     f"{f(a['base_global'])} | {f(a['fedit_global'])} | {f(a['oneshot_global'])} | "
                     f"{f(a['gap_global'])} | {f(a['rel_gap_global'], 2)} | {f(a['fedit_local'])} | "
                     f"{f(a['oneshot_local'])} | {a['comm_ratio']['mean']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = ((axes[0], "parameters", "gap_global", "gap: oneshot − fedit global test loss (nats)"),
              (axes[1], "parameters", "rel_gap_global", "relative gap: gap / (base − fedit)"),
              (axes[2], "nats_per_char", "gap_global", "gap (nats), against pre-training quality"))
    for ax, xkey, key, label in panels:
        for fam, names, style in (("zoo (equal pre-training tokens)", ZOO_MODELS, "o-"),
                                  ("stories260K (long pre-training)", ("stories260K",), "s"),
                                  ("SmolLM2-135M-Instruct", (SMOL,), "D")):
            pts = [(s[m][xkey], s[m][key]["mean"], s[m][key]["ci95"]) for m in names if m in s]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, fmt=style, capsize=4, label=fam)
        ax.axhline(0, color="grey", lw=0.8)
        if xkey == "parameters":
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
        else:
            ax.set_xlabel("held-out TinyStories nats/char (better model →)")
            ax.invert_xaxis()
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("One-shot vs multi-round federated LoRA on Dolly (5 clients, 20 local steps each; mean ± 95% CI, 3 seeds)",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def combine(files: list[str], out: str) -> int:
    parts = [json.loads(Path(f).read_text()) for f in files]
    seen, runs = set(), []
    for r in (r for part in parts for r in part["runs"]):  # a part started from a copy of another repeats its runs
        key = (r["phase"], r["model"], r["seed"], r["algorithm"], r["lr"])
        if key not in seen:
            seen.add(key)
            runs.append(r)
    models: dict = {}
    for part in parts:
        models.update(part["models"])
    merged_tuning = {k: v for part in parts for k, v in part.get("tuning", {}).items()}
    merged = {**{k: v for k, v in parts[0].items() if k not in ("runs", "summary", "models", "command", "wall_s", "tuning")},
              "models": models, "tuning": merged_tuning,
              "parts": [{"file": f, "command": part["command"], "wall_s": part["wall_s"], "seeds": part["seeds"],
                         "threads": part.get("threads")} for f, part in zip(files, parts)],
              "runs": runs, "summary": summarise(runs, models, merged_tuning)}
    atomic_write_json(out, merged)
    print(table(merged["summary"]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=os.environ.get("MIRA_ASSETS"), help="folder with data/ and models/ (or MIRA_ASSETS)")
    p.add_argument("--seeds", default="0,1,2", help="test seeds (each also draws the data sample)")
    p.add_argument("--tune-seed", type=int, default=0, help="seed whose validation split chooses the learning rates")
    p.add_argument("--models", default="x1,x4,x16,x64,stories260K")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--test-size", type=int, default=20, help="test records per client")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each client's training records held out")
    p.add_argument("--lr-grid", default="1e-3,3e-3,1e-2", help="learning rates tried on validation (zoo, stories260K)")
    p.add_argument("--smol-lr-grid", default="1e-3,3e-3", help="learning rates tried on validation for SmolLM2")
    p.add_argument("--algorithms", default="fedit,oneshot",
                   help="run only these (e.g. one per process, side by side; --combine merges the files)")
    p.add_argument("--max-extend", type=int, default=2,
                   help="when the best learning rate is at an edge of the grid, try up to this many more beyond it")
    p.add_argument("--pretrain-steps", type=int, default=600, help="zoo pre-training steps (batch 8 x 128 tokens)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "oneshot_experiment"), help="engine run folders (scratch)")
    p.add_argument("--cache", default=None, help="zoo model cache (default $MIRA_CACHE/zoo or ~/.cache/mira/zoo)")
    p.add_argument("--combine", default=None, help="comma-separated result files: merge their runs into --out; runs nothing")
    p.add_argument("--plot", default=None, help="a result file: draw the gap-vs-parameters figure (--figure); runs nothing")
    p.add_argument("--figure", default=str(PLOT))
    args = p.parse_args(argv)
    if args.combine:
        return combine(args.combine.split(","), args.out)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.figure))
        return 0
    if not args.assets:
        p.error("--assets (or MIRA_ASSETS) is required")
    from mira.models.demo import cache_dir
    from mira.models.loader import quiet_transformers

    quiet_transformers()
    args.cache = Path(args.cache) if args.cache else cache_dir() / "zoo"
    seeds = [int(s) for s in args.seeds.split(",")]
    models = args.models.split(",")
    t_all = time.perf_counter()
    corpus = Path(args.assets) / "data" / "tinystories" / "tinystories_val.txt"
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    runs: list[dict] = prev.get("runs", [])
    infos: dict = prev.get("models", {})
    tuning: dict = prev.get("tuning", {})
    paths = {}
    for m in models:
        t0 = time.perf_counter()
        paths[m], info = model_path(m, args)
        if m not in infos:
            info["nats_per_char"] = nats_per_char(paths[m], corpus)
            infos[m] = info
        log(f"model {m}: {infos[m]['parameters']:,} parameters, {infos[m]['nats_per_char']:.4f} nats/char on held-out "
            f"TinyStories ({time.perf_counter() - t0:.0f}s)")
    meta = {"setting": {"config": "examples/dolly.yaml", "clients": 5, "rounds": args.rounds, "local_steps": args.local_steps,
                        "batch_size": args.batch_size, "test_size": args.test_size, "val_fraction": args.val_fraction,
                        "total_local_steps_per_client": args.rounds * args.local_steps, "eval": "end only",
                        "pretrain_steps": args.pretrain_steps, "held_out_chars": HELD_OUT_CHARS,
                        "selection": f"lowest mean validation loss at seed {args.tune_seed}"},
            "seeds": seeds, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/oneshot_experiment.py", *(argv or sys.argv[1:])])}

    def done(phase, m, s, a, lr=None):
        return next((r for r in runs if r["phase"] == phase and r["model"] == m and r["seed"] == s
                     and r["algorithm"] == a and (lr is None or math.isclose(r["lr"], lr))), None)

    def record(row):
        runs.append(row)
        atomic_write_json(args.out, {**meta, "models": infos, "tuning": tuning, "runs": runs, "summary": summarise(runs, infos, tuning),
                        "wall_s": time.perf_counter() - t_all})

    ws_cache: dict = {}
    for m in models:  # model-major: tuning, then the seeds
        grid = [float(x) for x in (args.smol_lr_grid if m == SMOL else args.lr_grid).split(",")]
        for algo in args.algorithms.split(","):
            # every rate already measured at the tuning seed counts (e.g. an extension made by another process)
            tried = sorted({*grid, *(r["lr"] for r in runs if r["phase"] == "tune" and r["model"] == m
                                     and r["seed"] == args.tune_seed and r["algorithm"] == algo)})
            while True:
                for lr in tried:
                    if done("tune", m, args.tune_seed, algo, lr) is None:
                        r = run_one(args, m, paths[m], args.tune_seed, algo, lr, ws_cache, "tune")
                        r["phase"] = "tune"
                        record(r)
                        log(f"tune {m} {algo} lr {lr:g}: val {r['val']:.4f} ({r['wall_s']:.0f}s)")
                cands = sorted((done("tune", m, args.tune_seed, algo, lr) for lr in tried), key=lambda r: r["lr"])
                best = min(cands, key=lambda r: r["val"])
                # the best at an edge of the grid: extend the grid that way (same ratio), up to --max-extend points
                step = cands[1]["lr"] / cands[0]["lr"] if len(cands) > 1 else 3.0
                if len(tried) - len(set(grid)) >= args.max_extend or best["lr"] not in (cands[0]["lr"], cands[-1]["lr"]):
                    break
                tried.append(best["lr"] * step if best["lr"] == cands[-1]["lr"] else best["lr"] / step)
            tuning[f"{m}/{algo}"] = {"grid": [r["lr"] for r in cands], "val": [r["val"] for r in cands], "lr": best["lr"],
                                     "at_grid_edge": best["lr"] in (cands[0]["lr"], cands[-1]["lr"])}
        for s in seeds:
            for algo in args.algorithms.split(","):
                lr = tuning[f"{m}/{algo}"]["lr"]
                if done("test", m, s, algo, lr) is None:
                    r = run_one(args, m, paths[m], s, algo, lr, ws_cache, "test")
                    r["phase"] = "test"
                    record(r)
                    log(f"test {m} seed {s} {algo} lr {lr:g}: base {r['base_global']:.4f} global {r['global']:.4f} "
                        f"local {r['local']:.4f} ({r['wall_s']:.0f}s)")
    result = {**meta, "models": infos, "tuning": tuning, "runs": runs, "summary": summarise(runs, infos, tuning),
              "wall_s": time.perf_counter() - t_all}
    atomic_write_json(args.out, result)
    print(table(result["summary"]))
    log(f"done in {time.perf_counter() - t_all:.0f}s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
