"""SHED only (no fine-tunes) on the planted-noise data: the AUC per seed of one setting (for tuning seeds).

    MIRA_THREADS=1 python benchmarks/shed_planted_noise_tune.py --assets ${MIRA_ASSETS} --seeds 10 \
        --loss-weighting record --train-seeds per_unit [set:FIELD=JSON ...]

Takes ``shed_planted_noise.py``'s options, plus ``set:field=value`` for any other ``ShedSettings`` field;
embeddings are cached in $SHED_EMB_CACHE (default /tmp/shed_study)."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import shed_planted_noise as B
import shed_common as C

EMB_CACHE = os.environ.get("SHED_EMB_CACHE", "/tmp/shed_study")


def main():
    argv = sys.argv[1:]
    extra = {}
    rest = []
    for a in argv:
        if a.startswith("set:"):
            k, v = a[4:].split("=", 1)
            extra[k] = json.loads(v)
        else:
            rest.append(a)
    args = B.parse_args(rest)
    C.setup_torch()
    from mira.shed import ShedSettings, refine
    from mira.shed.embed import embed_records
    from mira.shed.value import ProxyModel
    model = args.model or os.path.join(args.assets, "models", "stories260K")
    dolly = C.load_dolly(args.assets, args.dolly)
    base = ShedSettings(model=model, embedder=args.embedder, embed_fields=args.embed_fields, embed_max_length=128,
                        clusters=args.clusters, iterations=args.iterations, group_size=args.group_size,
                        steps=args.steps, lr=args.value_lr, batch_size=args.batch_size, max_length=args.max_length,
                        template=args.template, budget_fraction=args.budget, strategy="qocs",
                        background=args.background, center=not args.no_center, antithetic=not args.no_antithetic,
                        tolerance=args.tolerance, loss_weighting=args.loss_weighting,
                        train_seeds=args.train_seeds,
                        **({"warm_start_steps": args.warm_start_steps, "proxy_size": args.proxy_size} | extra))
    proxy = ProxyModel.load(base)
    out = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        sizes = [args.n_pool, args.n_val, args.n_test, 1000]
        pool_i, val_i, test_i, res_i, _ = C.disjoint_parts(len(dolly), sizes, seed)
        clean = [dolly[i] for i in pool_i]
        pool, bad = C.corrupt(clean, args.corrupt, args.mode, seed, [dolly[i].output for i in res_i])
        val = [dolly[i] for i in val_i]
        os.makedirs(EMB_CACHE, exist_ok=True)
        emb_path = f"{EMB_CACHE}/emb_{args.mode}_{seed}_{args.n_pool}_{args.embed_fields}.npy"
        if os.path.exists(emb_path):
            emb = np.load(emb_path)
        else:
            emb = embed_records(pool, args.embedder, 64, 128, args.embed_fields); np.save(emb_path, emb)
        res = refine(pool, base.model_copy(update={"seed": seed}), val_records=val, embeddings=emb, proxy=proxy)
        cl = res.clustering
        clean_share = np.array([1 - bad[m].mean() for m in cl.members])
        r = {"seed": seed, "auc": C.auc(res.values[cl.labels], bad), "auc_prox": C.auc(res.values, bad[cl.proxies]),
             "best": C.auc(clean_share[cl.labels], bad), "split_half": res.reliability.split_half,
             "spread": res.reliability.value_spread, "se": res.reliability.mean_stderr,
             "evals": res.reliability.evaluations, "wall": res.timings["total_s"],
             "sel_bad": float(bad[res.indices].mean())}
        print(json.dumps(r), flush=True)
        out.append(r)
    a = [r["auc"] for r in out]
    print("SUMMARY", " ".join(rest), extra, "AUC", np.round(a, 3).tolist(), "mean %.3f" % np.mean(a),
          "wall", round(sum(r["wall"] for r in out)), flush=True)

main()
