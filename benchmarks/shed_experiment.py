"""SHED vs. random vs. all data on Dolly-15k with stories260K (a CPU-sized replication).

Protocol (all sizes are flags; defaults sized for <= 15 minutes on one CPU thread):

* Dolly-15k is shuffled once (``--data-seed``) and cut into disjoint parts: a training
  pool of ``--n-train`` records, ``--n-val`` validation records (SHED's v(S) is scored on
  them; no fine-tune sees them) and ``--n-test`` test records.
* The pool is embedded once with all-MiniLM-L6-v2 (``--embed-max-length`` tokens).
* For each seed: SHED clusters the pool (``--clusters``), computes Monte-Carlo Shapley
  values of the proxies with stories260K + LoRA as the value model, and selects
  ``--budget`` of the pool with QOCS and with QWCS (one Shapley run serves both).
* Conditions, each a fresh LoRA on stories260K trained for the same ``--train-steps``:
  (a) all of the pool, (b) a random ``--budget``, (c) SHED-QOCS, (d) SHED-QWCS.
  Metrics: test loss (mean NLL per response token) and ROUGE-L of greedy generations on
  the first ``--rouge-examples`` test records.
* Wall times: embedding (once), clustering + Shapley per seed, and each fine-tune.

    MIRA_THREADS=1 python benchmarks/shed_experiment.py --assets /work/shared

Writes ``benchmarks/results/shed_experiment.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("MIRA_ASSETS", "../shared"),
                   help="folder with data/dolly-15k and models/stories260K (default: $MIRA_ASSETS)")
    p.add_argument("--dolly", default=None, help="path to databricks-dolly-15k.jsonl (default: under --assets)")
    p.add_argument("--model", default=None, help="proxy and fine-tuned model (default: stories260K under --assets)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--group-size", type=int, default=10)
    p.add_argument("--value-epochs", type=float, default=1.0,
                   help="passes over S per v(S) (ceil(epochs*|S|/batch) steps)")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--beta", type=float, default=1.0, help="QWCS beta on standardised values")
    p.add_argument("--train-steps", type=int, default=80, help="steps of every fine-tune condition")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--template", default="compact", help="prompt template (mira.data.prompts)")
    p.add_argument("--embedder", default="all-MiniLM-L6-v2")
    p.add_argument("--embed-max-length", type=int, default=128)
    p.add_argument("--rouge-examples", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/shed_experiment.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("MIRA_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["MIRA_THREADS"]))
    import transformers

    transformers.logging.set_verbosity_error()
    from mira.config import DataConfig
    from mira.data.prompts import tokenize_records
    from mira.data.records import DollySource
    from mira.eval.metrics import eval_loss, generate, generation_metrics
    from mira.io import atomic_write_json
    from mira.shed import ShedSettings, refine
    from mira.shed.embed import embed_records
    from mira.shed.refine import standardized
    from mira.shed.select import select
    from mira.shed.value import ProxyModel
    from mira.train.trainer import LocalTrainer, TrainSettings

    assets = Path(args.assets)
    dolly = Path(args.dolly) if args.dolly else assets / "data/dolly-15k/databricks-dolly-15k.jsonl"
    model_path = args.model or str(assets / "models/stories260K")
    if not dolly.exists():
        sys.exit(f"Dolly-15k not found at {dolly}; pass --assets or --dolly")
    seeds = [int(s) for s in args.seeds.split(",")]
    t_all, cpu_all, load_start = time.perf_counter(), time.process_time(), os.getloadavg()

    records = DollySource().load(DataConfig(source="dolly", path=str(dolly), max_per_task=None))
    perm = np.random.default_rng(args.data_seed).permutation(len(records))
    pool = [records[i] for i in perm[: args.n_train]]
    val = [records[i] for i in perm[args.n_train: args.n_train + args.n_val]]
    test = [records[i] for i in perm[args.n_train + args.n_val: args.n_train + args.n_val + args.n_test]]
    k = max(1, round(args.budget * len(pool)))
    print(f"Dolly-15k: {len(records)} records -> pool {len(pool)}, SHED validation {len(val)}, test {len(test)}; "
          f"budget {k} records", flush=True)

    t0 = time.perf_counter()
    emb_full = np.asarray(embed_records(pool, args.embedder, 64, args.embed_max_length))
    embed_s = time.perf_counter() - t0
    print(f"embedded {len(pool)} records with {args.embedder} in {embed_s:.1f}s", flush=True)

    base_settings = ShedSettings(model=model_path, embedder=args.embedder, embed_max_length=args.embed_max_length,
                                 budget=k, clusters=args.clusters,
                                 iterations=args.iterations, group_size=args.group_size, epochs=args.value_epochs,
                                 tolerance=args.tolerance, lr=args.lr, batch_size=args.batch_size,
                                 max_length=args.max_length, template=args.template, beta=args.beta, standardize=True,
                                 strategy="qocs")
    proxy = ProxyModel.load(base_settings)
    pad = proxy.pad_id
    test_ds = tokenize_records(test, proxy.tokenizer, args.max_length, args.template, "truncate_input")
    train_settings = TrainSettings(lr=args.lr, batch_size=args.batch_size, steps=args.train_steps)
    trainer = LocalTrainer(proxy.slot, pad, train_settings)

    def evaluate() -> dict:
        loss, _ = eval_loss(proxy.model, test_ds, pad, 16)
        preds = generate(proxy.model, proxy.tokenizer, test_ds, max_new_tokens=32, limit=args.rouge_examples)
        refs = [r.output for r in test_ds.records[: len(preds)]]
        return {"test_loss": loss, **generation_metrics(preds, refs)}

    def finetune(subset: list, seed: int) -> dict:
        proxy.slot.set(proxy.slot.initial_state)
        ds = tokenize_records(subset, proxy.tokenizer, args.max_length, args.template, "truncate_input")
        t = time.perf_counter()
        res = trainer.train(ds, seed=seed)
        train_s = time.perf_counter() - t
        return {"n": len(subset), "train_s": train_s, "train_loss": res.loss, **evaluate()}

    proxy.slot.set(proxy.slot.initial_state)
    base = evaluate()
    print(f"base model: test loss {base['test_loss']:.4f}, ROUGE-L {base['rouge_l']:.4f}", flush=True)

    runs = []
    for seed in seeds:
        s = base_settings.model_copy(update={"seed": seed})
        t0 = time.perf_counter()
        res = refine(pool, s, val_records=val, embeddings=emb_full, proxy=proxy)
        refine_s = time.perf_counter() - t0
        qocs = res.indices
        qwcs = sorted(select("qwcs", res.clustering, standardized(res.values), k, seed=seed, beta=args.beta))
        rnd = sorted(np.random.default_rng([seed, 99]).choice(len(pool), size=k, replace=False).tolist())
        sh = res.shapley
        print(f"seed {seed}: SHED {res.clustering.k} clusters, {sh.evaluations} v(S) evaluations "
              f"({sh.cache_hits} cache hits, {sh.truncated_groups}/{sh.total_groups} groups truncated), "
              f"v(empty) {sh.v_empty:.4f} v(all) {sh.v_full:.4f}, {refine_s:.1f}s", flush=True)
        row = {"seed": seed, "refine_s": refine_s, "shapley_s": sh.seconds, "cluster_s": res.timings["cluster_s"],
               "evaluations": sh.evaluations, "cache_hits": sh.cache_hits, "truncated_groups": sh.truncated_groups,
               "total_groups": sh.total_groups, "v_empty": sh.v_empty, "v_full": sh.v_full,
               "value_std": float(np.std(res.values)), "conditions": {}}
        for name, subset in (("all", pool), ("random", [pool[i] for i in rnd]), ("shed_qocs", [pool[i] for i in qocs]),
                             ("shed_qwcs", [pool[i] for i in qwcs])):
            m = finetune(subset, seed)
            row["conditions"][name] = m
            print(f"  {name:9s} n={m['n']:5d} test loss {m['test_loss']:.4f} ROUGE-L {m['rouge_l']:.4f} "
                  f"({m['train_s']:.1f}s)", flush=True)
        runs.append(row)

    names = ["all", "random", "shed_qocs", "shed_qwcs"]
    summary = {}
    for name in names:
        losses = [r["conditions"][name]["test_loss"] for r in runs]
        rouge = [r["conditions"][name]["rouge_l"] for r in runs]
        train_s = [r["conditions"][name]["train_s"] for r in runs]
        summary[name] = {"test_loss_mean": float(np.mean(losses)), "test_loss_std": float(np.std(losses)),
                         "rouge_l_mean": float(np.mean(rouge)), "rouge_l_std": float(np.std(rouge)),
                         "train_s_mean": float(np.mean(train_s)), "n": runs[0]["conditions"][name]["n"]}
    wins = {name: sum(r["conditions"][name]["test_loss"] < r["conditions"]["random"]["test_loss"] for r in runs)
            for name in ("shed_qocs", "shed_qwcs")}
    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "settings": vars(args) | {"budget_count": k, "shed": base_settings.model_dump(mode="json")},
        "base_model": base,
        "embed_s": embed_s,
        "runs": runs,
        "summary": summary,
        "shed_beats_random_test_loss": wins,
        "total_s": time.perf_counter() - t_all,
        "total_cpu_s": time.process_time() - cpu_all,
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
    }
    atomic_write_json(args.out, result)
    print_table(result)
    print(f"written: {args.out} (wall {result['total_s']:.0f}s, CPU {result['total_cpu_s']:.0f}s, "
          f"load average {result['load_average_start_end']})")
    return result


def print_table(result: dict) -> None:
    s, n_seeds = result["summary"], len(result["runs"])
    print(f"\n| condition | records | test loss (mean ± std, {n_seeds} seeds) | ROUGE-L | fine-tune s |")
    print("|---|---:|---:|---:|---:|")
    b = result["base_model"]
    print(f"| base model (no fine-tune) | 0 | {b['test_loss']:.4f} | {b['rouge_l']:.4f} | 0 |")
    for name, e in s.items():
        print(f"| {name} | {e['n']} | {e['test_loss_mean']:.4f} ± {e['test_loss_std']:.4f} | "
              f"{e['rouge_l_mean']:.4f} ± {e['rouge_l_std']:.4f} | {e['train_s_mean']:.1f} |")
    refine_s = [r["refine_s"] for r in result["runs"]]
    print(f"\nrefinement: embedding {result['embed_s']:.1f}s once + clustering/Shapley "
          f"{np.mean(refine_s):.1f}s per seed; "
          f"SHED beats random on test loss in {result['shed_beats_random_test_loss']} of {n_seeds} seeds")


if __name__ == "__main__":
    main()
