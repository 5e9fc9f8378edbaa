"""Can a one-gradient-step value function see planted bad records? (issue 12: a cheap task-aware proxy)

    MIRA_THREADS=2 python benchmarks/shed_gradient_probe.py --assets ${MIRA_ASSETS} --seed 10 \
        --model smollm2-135m-instruct --template auto --out benchmarks/results/shed_gradient_probe_smollm2.json

The planted-noise data of ``shed_planted_noise.py`` (240 Dolly records, 25 % with a canned non-answer for
``boiler``; 200 clean validation records). At the fresh LoRA state of the proxy, each pool record's gradient
``g_i`` (its own mean token loss: every record weighs the same) and the gradient ``g_val`` of the
validation loss. Reported, as AUCs of "clean above bad" (0.5 = chance):

* the first-order value of one SGD step on a record, ``<g_val, g_i>`` (the TracIn / gradient-alignment
  shortcut: what v({i}) - v(empty) would be to first order), and its cosine;
* minus the gradient norm (a bad record the proxy finds surprising has a large gradient);
* the exact one-step check: the validation loss (on ``--n-step-val`` records) after one step along the mean
  gradient of (a) all pool records, (b) the clean ones only, (c) 30 records of which 8 bad, (d) 30 clean,
  at a few learning rates, and the same four steps scaled to one length (the clean step's). If one step on a mixture with bad records lowers the validation loss *more*
  than one on clean records, no short-budget v(S) can rank the bad records last.

Uses only the planted-noise seeds for tuning (10, 11 by convention), never the evaluation seeds 0-2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np

import shed_common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("MIRA_ASSETS", "../shared"))
    p.add_argument("--model", default=None, help="proxy (default: stories260K under --assets)")
    p.add_argument("--template", default="compact")
    p.add_argument("--mode", default="boiler", choices=["salad", "shuffle", "chars", "boiler"])
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-step-val", type=int, default=64, help="validation records of the exact one-step check")
    p.add_argument("--lrs", default="0.2,1.0")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch = C.setup_torch()
    from mira.data.prompts import collate, tokenize_records
    from mira.eval.metrics import eval_loss
    from mira.io import atomic_write_json
    from mira.shed import ShedSettings
    from mira.shed.value import ProxyModel, record_mean_loss

    model = args.model or os.path.join(args.assets, "models", "stories260K")
    dolly = C.load_dolly(args.assets, None)
    pool_i, val_i, _, res_i, _ = C.disjoint_parts(len(dolly), [240, 200, 200, 1000], args.seed)
    pool, bad = C.corrupt([dolly[i] for i in pool_i], 0.25, args.mode, args.seed, [dolly[i].output for i in res_i])
    val = [dolly[i] for i in val_i]
    proxy = ProxyModel.load(ShedSettings(model=model, template=args.template, seed=args.seed))
    m = proxy.model
    params = proxy.slot.trainable(proxy.slot.keys())
    for p in params:
        p.requires_grad_(True)
    ds = tokenize_records(pool, proxy.tokenizer, args.max_length, args.template, "truncate_input")
    vds = tokenize_records(val, proxy.tokenizer, args.max_length, args.template, "truncate_input")
    bad_rows = bad[np.array(ds.source_index)]

    def grad(dsx, rows):
        m.zero_grad(set_to_none=True)
        loss = record_mean_loss(m, collate(dsx, rows, proxy.pad_id, "cpu"))
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in params]).clone()

    t0 = time.perf_counter()
    G = torch.stack([grad(ds, [i]) for i in range(len(ds))])
    gv = torch.zeros_like(G[0])
    for st in range(0, len(vds), 16):
        rows = list(range(st, min(len(vds), st + 16)))
        gv += grad(vds, rows) * len(rows)
    gv /= len(vds)
    grad_s = time.perf_counter() - t0
    norms = G.norm(dim=1)
    align = G @ gv
    cos = align / (norms * gv.norm()).clamp(min=1e-30)
    out = {"model": model, "template": args.template, "mode": args.mode, "seed": args.seed,
           "pool_rows": len(ds), "bad_rows": int(bad_rows.sum()), "val_rows": len(vds),
           "lora_parameters": int(G.shape[1]), "gradient_seconds": round(grad_s, 1),
           "auc_first_order": C.auc(align.numpy(), bad_rows), "auc_cosine": C.auc(cos.numpy(), bad_rows),
           "auc_minus_norm": C.auc(-norms.numpy(), bad_rows),
           "grad_norm_bad": float(norms[bad_rows].mean()), "grad_norm_clean": float(norms[~bad_rows].mean()),
           "first_order_bad": float(align[bad_rows].mean()), "first_order_clean": float(align[~bad_rows].mean())}
    print(json.dumps(out), flush=True)

    step_ds = tokenize_records(val[:args.n_step_val], proxy.tokenizer, args.max_length, args.template,
                               "truncate_input")
    start = proxy.slot.get()

    def loss_after(direction, lr):
        with torch.no_grad():
            off = 0
            for p in params:
                n = p.numel()
                p -= lr * direction[off:off + n].view_as(p)
                off += n
        loss = eval_loss(m, step_ds, proxy.pad_id, 16)[0]
        proxy.slot.set(start)
        return float(loss)

    rng = np.random.default_rng(args.seed)
    clean_idx, bad_idx = np.flatnonzero(~bad_rows), np.flatnonzero(bad_rows)
    mix = G[np.r_[rng.choice(clean_idx, 22, replace=False), rng.choice(bad_idx, 8, replace=False)]].mean(0)
    clean30 = G[rng.choice(clean_idx, 30, replace=False)].mean(0)
    directions = {"all": G.mean(0), "clean": G[clean_idx].mean(0), "mix30_8bad": mix, "clean30": clean30}
    out["one_step_val_rows"] = len(step_ds)
    out["one_step_base"] = loss_after(G[0] * 0, 0.0)
    out["one_step"] = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        row = {"lr": lr, **{k: round(loss_after(d, lr), 4) for k, d in directions.items()}}
        # the same steps at one length (lr x the clean mean gradient's norm): is a mixture better only because
        # its bad records' larger gradients make a longer step?
        length = lr * float(directions["clean"].norm())
        row["equal_length"] = {k: round(loss_after(d / d.norm() * length, 1.0), 4) for k, d in directions.items()}
        print(json.dumps(row), flush=True)
        out["one_step"].append(row)
    out["machine"] = C.machine(torch)
    if args.out:
        atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
