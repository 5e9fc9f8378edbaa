"""SHED on Dolly records with a known share of planted bad records (stories260K as the proxy).

Does SHED find bad data when there is some? Per seed (the seed draws the data sample, the
records corrupted, and everything in SHED):

* a pool of ``--n-pool`` Dolly records, ``--n-val`` validation records (v(S) only) and
  ``--n-test`` test records, disjoint; ``--corrupt`` of the pool get a bad response
  (``--mode boiler``, the default: one of a few canned non-answers such as "N/A" or "I'm sorry,
  but I cannot help with that request."; ``salad``: as many words drawn at random from other
  Dolly responses; ``chars``: random characters; ``shuffle``: the corrupted records swap
  responses);
* SHED (``mira.shed.refine``: MiniLM embeddings, k-means, Shapley values of the proxies with
  v(S) = minus the validation loss of stories260K + LoRA after ``--steps`` steps on S);
* (a) the AUC with which the cluster values rank corrupted records below clean ones (each
  record scored by its cluster's value), the same for the proxies alone, and the best AUC
  the clustering allows (clusters scored by their true clean share);
* (b) fresh LoRA fine-tunes of stories260K, the same ``--train-steps`` each, on: SHED-QOCS
  and SHED-QWCS ``--budget`` of the pool, a random sample of the same size, all of the pool,
  and the clean records only (an oracle); test loss on the clean test records.

    MIRA_THREADS=1 python benchmarks/shed_planted_noise.py --assets ${MIRA_ASSETS}   # 16 permutations

Writes ``benchmarks/results/shed_planted_noise.json`` (``--out``) and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shed_common as C  # noqa: E402

CONDITIONS = ("shed_qocs", "shed_qwcs", "random", "all", "clean_only")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("MIRA_ASSETS", "../shared"))
    p.add_argument("--dolly", default=None)
    p.add_argument("--model", default=None, help="proxy and fine-tuned model (default: stories260K under --assets)")
    p.add_argument("--n-pool", type=int, default=240)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--corrupt", type=float, default=0.25)
    p.add_argument("--mode", default="boiler", choices=["salad", "shuffle", "chars", "boiler"])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=float, default=0.2, help="fraction of the pool SHED and random keep")
    p.add_argument("--clusters", type=int, default=24)
    p.add_argument("--iterations", type=int, default=16)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="LoRA steps per v(S)")
    p.add_argument("--background", type=int, default=24, help="non-proxy records every v(S) also trains on")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW rate of the fine-tune conditions")
    p.add_argument("--value-lr", type=float, default=None, help="SGD rate of v(S) (default: ShedSettings, 0.1)")
    p.add_argument("--loss-weighting", default="token", choices=["token", "record"],
                   help="training loss of v(S): mean over tokens (default) or over records")
    p.add_argument("--train-seeds", default="fixed", choices=["fixed", "per_unit"],
                   help="v(S) training seed: one for every permutation (default) or one per antithetic pair")
    p.add_argument("--warm-start-steps", type=int, default=0,
                   help="v(S) starts from an adapter first trained this many steps on the non-proxy records")
    p.add_argument("--proxy-size", type=int, default=1,
                   help="records per cluster v(S) trains on: the proxy and the next nearest members (1: the proxy)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--template", default="compact")
    p.add_argument("--embedder", default="all-MiniLM-L6-v2")
    p.add_argument("--embed-fields", default="split", choices=["split", "example"])
    p.add_argument("--tolerance", type=float, default=None, help="truncation tolerance (default: the measured noise)")
    p.add_argument("--no-center", action="store_true")
    p.add_argument("--no-antithetic", action="store_true")
    p.add_argument("--train-steps", type=int, default=60, help="steps of every fine-tune condition")
    p.add_argument("--out", default="benchmarks/results/shed_planted_noise.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch = C.setup_torch()
    from mira.io import atomic_write_json
    from mira.shed import ShedSettings, refine
    from mira.shed.embed import embed_records
    from mira.shed.refine import standardized
    from mira.shed.select import select
    from mira.shed.value import ProxyModel

    t_all = time.perf_counter()
    model = args.model or os.path.join(args.assets, "models", "stories260K")
    dolly = C.load_dolly(args.assets, args.dolly)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = ShedSettings(model=model, embedder=args.embedder, embed_fields=args.embed_fields, embed_max_length=128,
                        clusters=args.clusters,
                        iterations=args.iterations, group_size=args.group_size, steps=args.steps, lr=args.value_lr,
                        batch_size=args.batch_size, max_length=args.max_length, template=args.template,
                        budget_fraction=args.budget, strategy="qocs", background=args.background,
                        center=not args.no_center, loss_weighting=args.loss_weighting,
                        train_seeds=args.train_seeds, warm_start_steps=args.warm_start_steps,
                        antithetic=not args.no_antithetic, tolerance=args.tolerance, proxy_size=args.proxy_size)
    proxy = ProxyModel.load(base)
    runs = []
    for seed in seeds:
        sizes = [args.n_pool, args.n_val, args.n_test, 1000]  # the last: responses for the word salad
        pool_i, val_i, test_i, res_i, _ = C.disjoint_parts(len(dolly), sizes, seed)
        clean = [dolly[i] for i in pool_i]
        pool, bad = C.corrupt(clean, args.corrupt, args.mode, seed, [dolly[i].output for i in res_i])
        val, test = [dolly[i] for i in val_i], [dolly[i] for i in test_i]
        t0 = time.perf_counter()
        emb = embed_records(pool, args.embedder, 64, 128, args.embed_fields)
        embed_s = time.perf_counter() - t0
        res = refine(pool, base.model_copy(update={"seed": seed}), val_records=val, embeddings=emb, proxy=proxy,
                     log=lambda m: print("   ", m, flush=True))
        k = res.budget_count
        cl = res.clustering
        rec_score = res.values[cl.labels]  # every record scored by its cluster's value
        clean_share = np.array([1 - bad[m].mean() for m in cl.members])
        proxies = cl.proxies
        row = {"seed": seed, "embed_s": embed_s, **C.shed_row(res),
               "auc_records": C.auc(rec_score, bad), "auc_proxies": C.auc(res.values, bad[proxies]),
               "auc_best_for_clustering": C.auc(clean_share[cl.labels], bad),
               "bad_proxies": int(bad[proxies].sum()),
               "pure_clusters": int(sum(bad[m].all() or (~bad[m]).all() for m in cl.members)),
               "split_half_auc": None,
               "cluster_values": [{"value": float(res.values[c]), "stderr": float(res.shapley.stderr[c]),
                                   "size": len(m), "bad_share": float(bad[m].mean()), "proxy_bad": bool(bad[m[0]])}
                                  for c, m in enumerate(cl.members)]}
        halves = res.shapley.split_half()
        if halves is not None:
            row["split_half_auc"] = [C.auc(h[cl.labels], bad) for h in halves]
        sel = {"shed_qocs": res.indices,
               "shed_qwcs": sorted(select("qwcs", cl, standardized(res.values), k, seed=seed, beta=1.0)),
               "random": sorted(np.random.default_rng([seed, 99]).choice(len(pool), size=k, replace=False).tolist()),
               "all": list(range(len(pool))), "clean_only": np.flatnonzero(~bad).tolist()}
        row["bad_share"] = {name: float(bad[idx].mean()) for name, idx in sel.items()}
        print(f"seed {seed}: AUC records {row['auc_records']:.3f} (proxies {row['auc_proxies']:.3f}, best for this "
              f"clustering {row['auc_best_for_clustering']:.3f}); split-half r {row['split_half']}; "
              f"noise sd {row['noise_sd']:.4f} vs spread {row['value_spread']:.4f}; {row['evaluations']} v(S), "
              f"{row['cache_hits']} cache hits, {row['wall_s']:.0f}s; bad share "
              + ", ".join(f"{n} {v:.2f}" for n, v in row["bad_share"].items()), flush=True)
        tuner = C.FineTuner(model, test, steps=args.train_steps, lr=args.lr, batch_size=args.batch_size,
                            max_length=args.max_length, template=args.template)
        row["base_test_loss"] = tuner.base()
        row["conditions"] = {}
        for name in CONDITIONS:
            m = tuner.run([pool[i] for i in sel[name]], seed)
            row["conditions"][name] = m
            print(f"  {name:10s} n={m['n']:4d} test loss {m['test_loss']:.4f} ({m['train_s']:.1f}s)", flush=True)
        runs.append(row)

    summary = summarize(runs)
    result = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "machine": C.machine(torch), "settings": vars(args) | {"shed": base.model_dump(mode="json")},
              "runs": runs, "summary": summary, "total_s": time.perf_counter() - t_all}
    atomic_write_json(args.out, result)
    print_tables(result)
    print(f"written: {args.out} (wall {result['total_s']:.0f}s)")
    return result


def merge(paths: list[str], out: str) -> dict:
    """One result from the per-seed results of the same settings (each its own process, e.g. one seed each)."""
    import json

    from mira.io import atomic_write_json

    parts = [json.load(open(p)) for p in paths]
    keep = ("seeds", "out")
    ref = {k: v for k, v in parts[0]["settings"].items() if k not in keep}
    for p, part in zip(paths, parts):
        if {k: v for k, v in part["settings"].items() if k not in keep} != ref:
            sys.exit(f"{p}: other settings than {paths[0]}")
    runs = [r for part in parts for r in part["runs"]]
    result = {"command": [part["command"] for part in parts], "merged_from": paths,
              "machine": [part["machine"] for part in parts], "settings": parts[0]["settings"],
              "runs": runs, "summary": summarize(runs), "total_s": sum(part["total_s"] for part in parts)}
    atomic_write_json(out, result)
    print_tables(result)
    print(f"written: {out} (wall {result['total_s']:.0f}s over {len(parts)} processes)")
    return result


def summarize(runs: list[dict]) -> dict:
    return {
        "auc_records": C.mean_ci([r["auc_records"] for r in runs]),
        "auc_proxies": C.mean_ci([r["auc_proxies"] for r in runs]),
        "auc_best_for_clustering": C.mean_ci([r["auc_best_for_clustering"] for r in runs]),
        "split_half": C.mean_ci([r["split_half"] if r["split_half"] is not None else np.nan for r in runs]),
        "test_loss": {n: C.mean_ci([r["conditions"][n]["test_loss"] for r in runs]) for n in CONDITIONS},
        "paired_vs_random": {n: C.mean_ci([r["conditions"][n]["test_loss"] - r["conditions"]["random"]["test_loss"]
                                           for r in runs]) for n in CONDITIONS if n != "random"},
        "bad_share": {n: C.mean_ci([r["bad_share"][n] for r in runs]) for n in CONDITIONS},
        "wall_s_per_shed_run": C.mean_ci([r["wall_s"] for r in runs]),
    }


def print_tables(result: dict) -> None:
    s, runs = result["summary"], result["runs"]
    n = len(runs)
    print("\n| seed | AUC (records) | AUC (proxies) | best AUC for the clustering | split-half r | noise sd of v(S) "
          "| value spread | v(S) evaluations | cache hits | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        sh = "n/a" if r["split_half"] is None else f"{r['split_half']:.2f}"
        print(f"| {r['seed']} | {r['auc_records']:.3f} | {r['auc_proxies']:.3f} | {r['auc_best_for_clustering']:.3f} "
              f"| {sh} | {r['noise_sd']:.4f} | {r['value_spread']:.4f} | {r['evaluations']} | {r['cache_hits']} "
              f"| {r['wall_s']:.0f} |")
    print(f"| mean ± 95% CI | {C.fmt_ci(s['auc_records'], 3)} | {C.fmt_ci(s['auc_proxies'], 3)} "
          f"| {C.fmt_ci(s['auc_best_for_clustering'], 3)} | {C.fmt_ci(s['split_half'], 2)} | | | | | |")
    print(f"\n| condition | records | corrupted share | test loss (mean ± 95% CI, {n} seeds) "
          "| minus random (paired) |")
    print("|---|---:|---:|---:|---:|")
    for name in CONDITIONS:
        d = s["paired_vs_random"].get(name)
        print(f"| {name} | {runs[0]['conditions'][name]['n']} | {s['bad_share'][name]['mean']:.2f} "
              f"| {C.fmt_ci(s['test_loss'][name])} | {C.fmt_ci(d) if d else '0'} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--merge":  # --merge A.json B.json ... --out OUT.json
        files = sys.argv[2:sys.argv.index("--out")] if "--out" in sys.argv else sys.argv[2:]
        merge(files, sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else "merged.json")
    else:
        main()
