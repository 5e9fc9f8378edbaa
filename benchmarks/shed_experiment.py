"""SHED vs random vs all data on Dolly-15k, stories260K as the proxy (a CPU-sized replication).

Protocol (sizes are flags; the defaults fit a 2-core machine):

* For each seed, Dolly-15k is cut into disjoint random parts (the seed draws them, so the
  intervals cover the data sample): a pool of ``--n-train`` records, ``--n-val`` validation
  records (SHED's v(S) only) and ``--n-test`` test records.
* SHED (``mira.shed.refine``): MiniLM embeddings, ``--clusters`` k-means clusters, Shapley
  values of the proxies (antithetic permutations, position control variate, truncation at
  the measured noise) with v(S) = minus the validation loss of stories260K + LoRA after a
  fixed ``--steps`` on S; the run's reliability report (split-half rank correlation, noise of
  one v(S), standard errors) is kept. QOCS and QWCS select ``--budget`` of the pool from one
  Shapley run.
* Conditions, each a fresh LoRA trained for the same ``--train-steps``: (a) all of the pool,
  (b) a random ``--budget``, (c) SHED-QOCS, (d) SHED-QWCS. Test loss (mean NLL per response
  token) on the test records; paired differences against random (same seed, same data).
* Transferability (``--transfer x4``, the paper's check): the same subsets fine-tune another,
  larger model from mira's one-shot zoo (``mira.models.zoo``: 1.05M parameters, pre-trained
  briefly on TinyStories and cached); ``--transfer none`` skips it.

    MIRA_THREADS=1 python benchmarks/shed_experiment.py --assets ${MIRA_ASSETS}

Writes ``benchmarks/results/shed_experiment.json`` and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shed_common as C  # noqa: E402

CONDITIONS = ("all", "random", "shed_qocs", "shed_qwcs")
ZOO_PRETRAIN_STEPS = {"x1": 300, "x4": 160, "x16": 80}  # as benchmarks/oneshot_experiment.py


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("MIRA_ASSETS", "../shared"),
                   help="folder with data/dolly-15k and models/stories260K (default: $MIRA_ASSETS)")
    p.add_argument("--dolly", default=None, help="path to databricks-dolly-15k.jsonl (default: under --assets)")
    p.add_argument("--model", default=None, help="proxy and fine-tuned model (default: stories260K under --assets)")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--group-size", type=int, default=None, help="default: clusters/10")
    p.add_argument("--steps", type=int, default=10, help="LoRA steps per v(S)")
    p.add_argument("--background", type=int, default=24, help="non-proxy records every v(S) also trains on")
    p.add_argument("--beta", type=float, default=1.0, help="QWCS beta on standardised values")
    p.add_argument("--train-steps", type=int, default=60, help="steps of every fine-tune condition")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW rate of the fine-tune conditions")
    p.add_argument("--value-lr", type=float, default=None, help="SGD rate of v(S) (default: ShedSettings, 0.1)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--template", default="compact", help="prompt template (mira.data.prompts)")
    p.add_argument("--embedder", default="all-MiniLM-L6-v2")
    p.add_argument("--embed-fields", default="split", choices=["split", "example"])
    p.add_argument("--embed-max-length", type=int, default=128)
    p.add_argument("--transfer", default="x4", help="zoo model to fine-tune on the same subsets, or 'none'")
    p.add_argument("--cache", default=None, help="zoo model cache (default $MIRA_CACHE/zoo or ~/.cache/mira/zoo)")
    p.add_argument("--out", default="benchmarks/results/shed_experiment.json")
    return p.parse_args(argv)


def zoo_model(name: str, args) -> tuple[str, dict]:
    import json

    from mira.models.demo import cache_dir
    from mira.models.zoo import ensure_zoo_model

    assets = Path(args.assets)
    cache = Path(args.cache) if args.cache else cache_dir() / "zoo"
    corpus = assets / "data" / "tinystories" / "tinystories_val.txt"
    out = ensure_zoo_model(name, assets / "models" / "stories260K", corpus, cache, steps=ZOO_PRETRAIN_STEPS[name],
                           seq_len=128, batch_size=8, lr=3e-3, max_seconds=240.0,
                           log=lambda m: print("   ", m, flush=True))
    return str(out), json.loads((out / "zoo.json").read_text())


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
    model = args.model or str(Path(args.assets) / "models" / "stories260K")
    dolly = C.load_dolly(args.assets, args.dolly)
    seeds = [int(s) for s in args.seeds.split(",")]
    transfer = None if args.transfer == "none" else zoo_model(args.transfer, args)
    base = ShedSettings(model=model, embedder=args.embedder, embed_fields=args.embed_fields,
                        embed_max_length=args.embed_max_length,
                        budget_fraction=args.budget, clusters=args.clusters, iterations=args.iterations,
                        group_size=args.group_size, steps=args.steps, background=args.background, lr=args.value_lr,
                        batch_size=args.batch_size, max_length=args.max_length, template=args.template,
                        beta=args.beta, standardize=True, strategy="qocs")
    proxy = ProxyModel.load(base)
    runs = []
    for seed in seeds:
        pool_i, val_i, test_i, _ = C.disjoint_parts(len(dolly), [args.n_train, args.n_val, args.n_test], seed)
        pool, val, test = ([dolly[i] for i in part] for part in (pool_i, val_i, test_i))
        t0 = time.perf_counter()
        emb = embed_records(pool, args.embedder, 64, args.embed_max_length, args.embed_fields)
        embed_s = time.perf_counter() - t0
        res = refine(pool, base.model_copy(update={"seed": seed}), val_records=val, embeddings=emb, proxy=proxy,
                     log=lambda m: print("   ", m, flush=True))
        k = res.budget_count
        sel = {"all": list(range(len(pool))),
               "random": sorted(np.random.default_rng([seed, 99]).choice(len(pool), size=k, replace=False).tolist()),
               "shed_qocs": res.indices,
               "shed_qwcs": sorted(select("qwcs", res.clustering, standardized(res.values), k, seed=seed,
                                          beta=args.beta))}
        row = {"seed": seed, "embed_s": embed_s, **C.shed_row(res), "budget_count": k,
               "overlap_with_random": {n: len(set(sel[n]) & set(sel["random"])) for n in ("shed_qocs", "shed_qwcs")}}
        print(f"seed {seed}: {row['evaluations']} v(S), {row['cache_hits']} cache hits, "
              f"split-half r {row['split_half']}, "
              f"noise sd {row['noise_sd']:.4f} vs spread {row['value_spread']:.4f}, {row['wall_s']:.0f}s", flush=True)
        for target, path in [("stories260K", model)] + ([(args.transfer, transfer[0])] if transfer else []):
            tuner = C.FineTuner(path, test, steps=args.train_steps, lr=args.lr, batch_size=args.batch_size,
                                max_length=args.max_length, template=args.template)
            out = {"base_test_loss": tuner.base()}
            for name in CONDITIONS:
                m = tuner.run([pool[i] for i in sel[name]], seed)
                out[name] = m
                print(f"  {target:11s} {name:9s} n={m['n']:5d} test loss {m['test_loss']:.4f} ({m['train_s']:.1f}s)",
                      flush=True)
            row.setdefault("finetune", {})[target] = out
        runs.append(row)

    targets = list(runs[0]["finetune"])
    summary = {"split_half": C.mean_ci([r["split_half"] if r["split_half"] is not None else np.nan for r in runs]),
               "reliable_runs": sum(r["reliable"] for r in runs),
               "wall_s_per_shed_run": C.mean_ci([r["wall_s"] for r in runs]),
               "evaluations": C.mean_ci([r["evaluations"] for r in runs])}
    for t in targets:
        summary[t] = {
            "test_loss": {n: C.mean_ci([r["finetune"][t][n]["test_loss"] for r in runs]) for n in CONDITIONS},
            "minus_random": {n: C.mean_ci([r["finetune"][t][n]["test_loss"] - r["finetune"][t]["random"]["test_loss"]
                                           for r in runs]) for n in CONDITIONS if n != "random"},
            "base": C.mean_ci([r["finetune"][t]["base_test_loss"] for r in runs])}
    result = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "machine": C.machine(torch), "settings": vars(args) | {"shed": base.model_dump(mode="json")},
              "transfer_model": transfer[1] if transfer else None, "runs": runs, "summary": summary,
              "total_s": time.perf_counter() - t_all}
    atomic_write_json(args.out, result)
    print_tables(result)
    print(f"written: {args.out} (wall {result['total_s']:.0f}s)")
    return result


def print_tables(result: dict) -> None:
    runs, s = result["runs"], result["summary"]
    print("\n| seed | clusters | v(S) evaluations | cache hits | truncated groups | noise sd of v(S) | value spread "
          "| mean SE | split-half r | verdict | wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in runs:
        sh = "n/a" if r["split_half"] is None else f"{r['split_half']:.2f}"
        print(f"| {r['seed']} | {r['clusters']} | {r['evaluations']} | {r['cache_hits']} | "
              f"{r['truncated_groups']}/{r['total_groups']} | {r['noise_sd']:.4f} | {r['value_spread']:.4f} | "
              f"{r['mean_stderr']:.4f} | {sh} | {'signal' if r['reliable'] else 'noise'} | {r['wall_s']:.0f} |")
    n = len(runs)
    for t in (k for k in s if isinstance(s[k], dict) and "test_loss" in s[k]):
        e = s[t]
        print(f"\n**{t}** (base {C.fmt_ci(e['base'])}): test loss, mean ± 95% CI over {n} seeds")
        print("\n| condition | records | test loss | minus random (paired) |")
        print("|---|---:|---:|---:|")
        for name in CONDITIONS:
            d = e["minus_random"].get(name)
            print(f"| {name} | {runs[0]['finetune'][t][name]['n']} | {C.fmt_ci(e['test_loss'][name])} | "
                  f"{C.fmt_ci(d) if d else '0'} |")


if __name__ == "__main__":
    main()
