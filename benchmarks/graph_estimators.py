"""Which estimator of MIRA's task graph recovers the tasks? (issue 10, the learned graph)

Runs MIRA with ``graph: similarity`` (the settings of docs/mira.md's 40-round Dolly rerun) and
records every client update the server receives, per LoRA tensor, then scores many graph
estimators on the *same* updates offline: the task AUC of each estimator's graph after every
round (same-task client pairs positive, as ``mira.federated.graph.task_auc``).

    python benchmarks/graph_estimators.py record --seeds 0 1 2 --out runs/graph-est/dolly
    python benchmarks/graph_estimators.py score runs/graph-est/dolly --json benchmarks/results/graph-estimators-dolly.json

``record`` writes ``seed<N>/updates.pt`` (per round: sampled clients and their updates as
tensor dicts, the adapters they started from) and resumes per seed. ``score`` never trains.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def record(args) -> None:
    from mira.config import load_config
    from mira.federated.compare import config_for
    from mira.federated.engine import Engine, Workspace

    base, _ = load_config(args.config, overrides=[f"federation.rounds={args.rounds}", f"eval.every={args.rounds}",
                                                "eval.global_loss=never", "plots=false"])
    opts = {"graph": "similarity", "similarity_average": True, "eta": args.eta, "lambda": args.lam,
            "federation.lr": args.lr}
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        if (out / "updates.pt").exists():
            print(f"seed {seed}: recorded already ({out})")
            continue
        cfg = config_for(base, "mira", opts, seed)
        ws = Workspace.load(cfg)
        eng = Engine(ws, cfg, out / "run", quiet=True)
        rec: list[dict] = []
        strat = eng.strategy
        orig = strat.aggregate_fit

        def spy(rnd, results, orig=orig, strat=strat, rec=rec):
            rec.append({"round": rnd, "updates": {cid: {k: (r.adapter[k].float() - strat.adapters[cid][k].float()).clone()
                                                        for k in r.adapter} for cid, r in results.items()},
                        "start": {cid: {k: strat.adapters[cid][k].float().clone() for k in r.adapter}
                                  for cid, r in results.items()}})
            return orig(rnd, results)

        strat.aggregate_fit = spy
        eng.run()
        tmp = out / "updates.pt.tmp"
        torch.save({"tasks": [c.task for c in ws.clients], "rounds": rec, "config": cfg.model_dump(mode="json")}, tmp)
        os.replace(tmp, out / "updates.pt")
        print(f"seed {seed}: {len(rec)} rounds recorded -> {out / 'updates.pt'}")


# -- estimators: each maps the history of updates to a K x K similarity -------------------------
def _flat(u: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([u[k].reshape(-1).double() for k in keys])


def _delta(u: dict, start: dict, keys: list[str]) -> torch.Tensor:
    """The update of the product B@A per module: (A+dA, B+dB) -> (B+dB)(A+dA) - BA, flattened."""
    outs = []
    for ka in [k for k in keys if "lora_A" in k]:
        kb = ka.replace("lora_A", "lora_B")
        a0, b0 = start[ka].double(), start[kb].double()
        a1, b1 = a0 + u[ka].double(), b0 + u[kb].double()
        outs.append((b1 @ a1 - b0 @ a0).reshape(-1))
    return torch.cat(outs)


def _cos(m: torch.Tensor) -> np.ndarray:
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = (m @ m.T).numpy()
    np.fill_diagonal(s, 0)
    return s


def _per_module_cos(vecs: dict[int, dict], ids: list[int], keys: list[str]) -> np.ndarray:
    s = 0
    for k in keys:
        s = s + _cos(torch.stack([vecs[i][k].reshape(-1).double() for i in ids]))
    return s / len(keys)


def _topk(s: np.ndarray, k: int) -> np.ndarray:
    """Keep each row's k largest entries (symmetrised by max): a k-nearest-neighbour graph with weights."""
    out = np.zeros_like(s)
    for i in range(len(s)):
        idx = np.argsort(-s[i])[:k]
        out[i, idx] = s[i, idx]
    return np.maximum(out, out.T)


def _second_order(s: np.ndarray) -> np.ndarray:
    """Correlation of the similarity rows: two clients are alike when they are alike to the same others."""
    r = np.corrcoef(s)
    r = np.nan_to_num(r)
    np.fill_diagonal(r, 0)
    return r


def score_seed(data: dict) -> dict[str, list[float | None]]:
    from mira.federated.graph import task_auc

    tasks = data["tasks"]
    k = len(tasks)
    keys = sorted(next(iter(data["rounds"][0]["updates"].values())))
    sums: dict[str, dict[int, torch.Tensor]] = {"factors": {}, "delta": {}, "factors_c": {}, "sign": {}}
    mod_sums: dict[int, dict] = {}
    counts: dict[int, int] = {}
    latest: dict[int, torch.Tensor] = {}
    curves: dict[str, list] = {}

    from mira.federated.graph import build_graph, profile_similarity

    real = {sim: build_graph("similarity", k, 0, similarity=sim, similarity_average=True)
            for sim in ("cosine", "profile")}  # mira's own classes, fed the same updates

    def put(name, s, ids):
        a = np.zeros((k, k))
        a[np.ix_(ids, ids)] = s
        curves.setdefault(name, []).append(task_auc(a, tasks))

    for r in data["rounds"]:
        ups, start = r["updates"], r["start"]
        mean = torch.stack([_flat(u, keys) for u in ups.values()]).mean(0) if len(ups) > 1 else None
        for cid, u in ups.items():
            f = _flat(u, keys)
            d = _delta(u, start[cid], keys)
            counts[cid] = counts.get(cid, 0) + 1
            for name, v in (("factors", f), ("delta", d), ("sign", torch.sign(f))):
                sums[name][cid] = sums[name].get(cid, 0) + v
            if mean is not None:
                sums["factors_c"][cid] = sums["factors_c"].get(cid, 0) + (f - mean)
            mod_sums[cid] = {kk: mod_sums.get(cid, {}).get(kk, 0) + u[kk].double() for kk in keys}
            latest[cid] = f
        for sim, g in real.items():
            g.update({cid: _flat(u, keys) for cid, u in ups.items()})
        ids = sorted(sums["factors"])
        if len(ids) < 2:
            continue
        for sim, g in real.items():
            curves.setdefault(f"mira graph: similarity={sim}, average", []).append(task_auc(g.a, tasks))
        fac = _cos(torch.stack([sums["factors"][i] for i in ids]))
        put("cosine+average (mira default)", np.clip(fac, 0, None), ids)
        put("cosine latest", np.clip(_cos(torch.stack([latest[i] for i in ids])), 0, None), ids)
        put("delta B@A + average", np.clip(_cos(torch.stack([sums["delta"][i] for i in ids])), 0, None), ids)
        put("sign agreement + average", np.clip(_cos(torch.stack([sums["sign"][i] for i in ids])), 0, None), ids)
        put("per-module cosine + average", np.clip(_per_module_cos(mod_sums, ids, keys), 0, None), ids)
        # centre the per-client averages by their mean across clients (the shared direction)
        avg = torch.stack([sums["factors"][i] / counts[i] for i in ids])
        put("cosine+average, centred across clients", np.clip(_cos(avg - avg.mean(0)), 0, None), ids)
        davg = torch.stack([sums["delta"][i] / counts[i] for i in ids])
        put("delta + average, centred across clients", np.clip(_cos(davg - davg.mean(0)), 0, None), ids)
        for kk in (3, 5):
            put(f"cosine+average, top-{kk}", _topk(np.clip(fac, 0, None), kk), ids)
        put("cosine+average, second order", np.clip(_second_order(fac), 0, None), ids)
        cen = _cos(avg - avg.mean(0))
        put("centred across clients, second order", np.clip(_second_order(cen), 0, None), ids)
        put("centred across clients, top-3", _topk(np.clip(cen, 0, None), 3), ids)
        put("centred across clients, cosine not clipped", (1 + cen) / 2, ids)  # (a ranking only: not a valid graph)
        dcen = _cos(davg - davg.mean(0))
        put("delta, centred across clients, second order", np.clip(_second_order(dcen), 0, None), ids)
        put("centred, second order on the others", profile_similarity(cen), ids)  # = mira's profile step
        put("centred across clients, second order, top-3", _topk(np.clip(_second_order(cen), 0, None), 3), ids)
    return curves


def score(args) -> None:
    seeds = sorted(Path(args.run).glob("seed*/updates.pt"))
    if args.seeds:
        seeds = [p for p in seeds if int(p.parent.name[4:]) in args.seeds]
    if not seeds:
        sys.exit(f"error: no seed*/updates.pt under {args.run}")
    per_seed = {}
    for p in seeds:
        per_seed[p.parent.name] = score_seed(torch.load(p, weights_only=False))
    names = list(next(iter(per_seed.values())))
    marks = [m for m in (10, 20, 30, 40) if all(len(c[names[0]]) >= m for c in per_seed.values())]
    table = {}
    print(f"{'estimator':44s} " + " ".join(f"r{m:<6d}" for m in marks) + "  per seed (last)")
    for n in names:
        rows = []
        for m in marks:
            vals = [c[n][m - 1] for c in per_seed.values() if c[n][m - 1] is not None]
            rows.append(float(np.mean(vals)) if vals else None)
        last = [round(c[n][-1], 3) for c in per_seed.values() if c[n][-1] is not None]
        table[n] = {"mean_by_round": dict(zip(map(str, marks), rows)), "last_per_seed": last,
                    "curve_mean": [float(np.mean([c[n][i] for c in per_seed.values() if c[n][i] is not None]))
                                   for i in range(min(len(c[n]) for c in per_seed.values()))]}
        print(f"{n:44s} " + " ".join(f"{v:.3f}  " if v is not None else "  -    " for v in rows) + f"  {last}")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(args.run), "seeds": list(per_seed), "estimators": table},
                                              indent=1))


def pair(args) -> None:
    """Seed-level paired differences (same seed = same data sample) of the algorithms in a new
    ``comparison.json`` against those of an earlier one run with the same config and seeds."""
    from mira.federated.compare import ci95

    new, ref = (json.loads(Path(p).read_text()) for p in (args.comparison, args.against))
    out = {}
    for name, e in new["algorithms"].items():
        mine = {r["seed"]: r for r in e["per_seed"]}
        for other, f in ref["algorithms"].items():
            theirs = {r["seed"]: r for r in f["per_seed"]}
            seeds = sorted(set(mine) & set(theirs))
            row = {"seeds": seeds}
            for m in ("mean_local_test_loss", "mean_global_test_loss"):
                d = [mine[s][m] - theirs[s][m] for s in seeds if mine[s].get(m) is not None
                     and theirs[s].get(m) is not None]
                row[m] = {"per_seed": d, "mean": float(np.mean(d)) if d else None, "ci95": ci95(d) if d else None}
            out[f"{name} - {other}"] = row
            loc, glo = row["mean_local_test_loss"], row["mean_global_test_loss"]
            print(f"{name[:40]} - {other[:45]}: local {loc['mean']:+.4f} +- {loc['ci95']:.4f} "
                  f"{[round(x, 4) for x in loc['per_seed']]}, global {glo['mean']:+.4f} +- {glo['ci95']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def plot(args) -> None:
    """Task AUC per round of a few estimators, from ``score --json`` files (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = {"mira graph: similarity=cosine, average": "cosine of the averages (used until the profile runs)",
            "mira graph: similarity=profile, average": "profile",
            "per-module cosine + average": "per-module cosine",
            "cosine+average, centred across clients": "centred, clipped at 0",
            "centred across clients, cosine not clipped": "centred, not clipped (ranking only)"}
    fig, axes = plt.subplots(1, len(args.json), figsize=(5.2 * len(args.json), 4), squeeze=False)
    for ax, (path, title) in zip(axes[0], zip(args.json, args.titles)):
        est = json.loads(Path(path).read_text())["estimators"]
        for key, label in show.items():
            if key in est:
                c = est[key]["curve_mean"]
                ax.plot(range(1, len(c) + 1), c, label=label, lw=2.2 if "profile" in key else 1.2,
                        ls=":" if "ranking" in label else "-")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set(title=title, xlabel="round", ylabel="task AUC (mean over seeds)", ylim=(0.3, 1.01))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--config", default=str(ROOT / "examples/mira-dolly.yaml"))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--rounds", type=int, default=40)
    r.add_argument("--lr", type=float, default=0.006)
    r.add_argument("--lam", type=float, default=1.0)
    r.add_argument("--eta", type=float, default=0.1)
    r.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("run")
    s.add_argument("--json")
    s.add_argument("--seeds", type=int, nargs="+", help="only these seeds (default: every recorded one)")
    p = sub.add_parser("pair")
    p.add_argument("comparison")
    p.add_argument("--against", required=True)
    p.add_argument("--json")
    q = sub.add_parser("plot")
    q.add_argument("--json", nargs="+", required=True)
    q.add_argument("--titles", nargs="+", required=True)
    q.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("MIRA_THREADS", "1")))
    {"record": record, "score": score, "pair": pair, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    main()
