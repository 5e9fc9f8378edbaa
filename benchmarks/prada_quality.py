"""Prada's quality on the real pair: does the proxy's offset adapt the black-box target?

Target: SmolLM2-135M-Instruct (the black box; it never trains on the private task). Proxy: a
folder written by ``mira proxy shrink`` (the same tokenizer). Private task: GSM8K. Four systems:

* **target alone**: the black box as it is;
* **proxy + LoRA**: the device's proxy with its LoRA adapter, alone;
* **Prada**: ``z_target + alpha * (z_proxy+LoRA - z_proxy)``, the logit offset on the target;
* **target + LoRA** (white-box upper bound): LoRA on the target itself, same records and settings.

Protocol:

1. per seed, ``--train`` GSM8K train records and ``--val`` validation records drawn with that seed
   (so each seed changes the data sample and the LoRA initialisation); a fixed test subset
   (``--test`` records of GSM8K test, drawn once with seed 1234) for every seed;
2. LoRA (r=8, alpha 16, q/v, batch 4, ``--steps`` steps) on the proxy and on the target with
   ``mira.prada.train.train_adapter``, the code behind ``mira proxy train``. The learning rate is
   chosen per model from ``--lrs`` on the validation loss at the first seed (the grid is doubled or
   halved past an edge that holds the best point, up to ``--max-extend`` times), then fixed; Prada's
   ``alpha`` from ``--alphas`` on the validation loss at the first seed, then fixed;
3. test loss: mean NLL per response token (teacher-forced; Prada from ``z_target + alpha * offset``),
   kept per record for paired differences;
4. greedy generation on the first ``--generate`` test prompts, at most ``--max-new-tokens``
   tokens: exact match of the final number (``mira.eval.metrics.gsm8k_answer``) and ROUGE-L.
   Prada generates in process with the per-token rule (``argmax z_target + alpha * offset``), which
   ``tests/prada`` shows equals the served per-token and speculative decoders token for token.

Results are written after every unit to ``--out`` (resumable: finished units are skipped).

    MIRA_ASSETS=../shared python benchmarks/prada_quality.py --proxy runs/prada_q/proxy12
    python benchmarks/prada_quality.py --summarize        # the tables from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("MIRA_THREADS", "1")

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ["MIRA_THREADS"]))

RESULTS = Path(__file__).resolve().parent / "results" / "prada_quality.json"
SYSTEMS = ("target alone", "proxy + LoRA", "Prada", "target + LoRA")


# -- scores --------------------------------------------------------------------------------------
@torch.no_grad()
def per_record_nll(ds, pad_id: int, logits_fn, batch_size: int = 8) -> list[tuple[float, int]]:
    """``(sum of NLL, response tokens)`` per example; ``logits_fn(input_ids, attention_mask)`` gives
    ``[batch, seq, vocab]`` scores."""
    from mira.data.prompts import IGNORE, collate

    out: list[tuple[float, int] | None] = [None] * len(ds)
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate(ds, idx, pad_id)
        z = logits_fn(batch["input_ids"], batch["attention_mask"])[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(z.reshape(-1, z.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                              reduction="none").view(labels.shape)
        for row, i in enumerate(idx):
            out[i] = (float(nll[row].sum()), int((labels[row] != IGNORE).sum()))
    return out  # type: ignore[return-value]


def mean_nll(rows: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in rows) / sum(n for _, n in rows)


def model_logits(model):
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def prada_logits(target, pair, alpha: float):
    def fn(ids, mask):
        return target(input_ids=ids, attention_mask=mask).logits.float() + alpha * pair.teacher_forced_offsets(ids, mask)
    return fn


# -- greedy generation ---------------------------------------------------------------------------
@torch.no_grad()
def greedy(next_scores, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    """Greedy decoding with ``next_scores(ids, new)`` -> scores of the token after ``ids``."""
    ids, new = list(prompt), list(prompt)
    out: list[int] = []
    for _ in range(max_new):
        token = int(torch.argmax(next_scores(ids, new)))
        if token in eos:
            break
        out.append(token)
        ids.append(token)
        new = [token]
    return out


class CachedModel:
    """A causal LM fed incrementally with its KV cache: ``scores(ids, new)`` after ``ids``."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def __call__(self, ids: list[int], new: list[int]) -> torch.Tensor:
        if len(new) == len(ids):
            self.cache = None
        out = self.model(input_ids=torch.tensor([new]), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[0, -1].float()


def generate_all(system: str, target, pair, alpha: float, prompts: list[list[int]], max_new: int,
                 eos: set[int], tokenizer) -> list[str]:
    texts = []
    for p in prompts:
        if system == "Prada":
            tgt = CachedModel(target)
            fn = lambda ids, new, tgt=tgt: tgt(ids, new) + alpha * pair.offset(ids)  # noqa: E731
        else:
            fn = CachedModel(target if system.startswith("target") else pair.model)
        texts.append(tokenizer.decode(greedy(fn, p, max_new, eos), skip_special_tokens=True).strip())
    return texts


# -- statistics ----------------------------------------------------------------------------------
def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% t interval (``mira.federated.compare.ci95``)."""
    from mira.federated.compare import ci95

    return sum(xs) / len(xs), ci95(xs)


# -- the experiment ------------------------------------------------------------------------------
def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", default=os.environ.get("MIRA_ASSETS", "../shared"))
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--proxy", default="runs/prada_q/proxy12")
    ap.add_argument("--workdir", default="runs/prada_quality")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--val", type=int, default=48)
    ap.add_argument("--test", type=int, default=96)
    ap.add_argument("--generate", type=int, default=24)
    ap.add_argument("--generate-seeds", default="0",
                    help="seeds whose systems also generate (generation costs ~10x the test loss on a CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3")
    ap.add_argument("--alphas", default="0.1,0.25,0.5,0.75,1.0,1.5")
    ap.add_argument("--max-extend", type=int, default=2,
                    help="times the learning-rate grid is extended past an edge that holds the best point")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--summarize", action="store_true", help="print the tables from --out and exit")
    args = ap.parse_args()
    out = Path(args.out)
    if args.summarize:
        summarize(load_json(out))
        return

    from mira.config import DataConfig
    from mira.data.prompts import tokenize_records
    from mira.data.records import load_records
    from mira.data.report import render_example
    from mira.eval.metrics import generation_metrics, gsm8k_exact_match
    from mira.io import atomic_write_json
    from mira.models.loader import load_base
    from mira.prada.offset import ProxyPair
    from mira.prada.train import AdapterTraining, train_adapter
    from peft import PeftModel
    from prada_experiment import combined_loss  # Prada's loss at every alpha, one target pass per batch
    from rich.console import Console

    assets, work = Path(args.assets), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    alphas = [float(x) for x in args.alphas.split(",")]
    res = load_json(out) or {"runs": {}, "choices": {}}
    # a resumed run keeps the choices and finished units, so the settings behind them must not change
    fixed = {k: vars(args)[k] for k in ("target", "proxy", "train", "val", "test", "generate", "max_new_tokens",
                                        "steps", "max_length", "lrs", "alphas", "max_extend", "generate_seeds")}
    if res.get("runs") and res.get("settings", fixed) != fixed:
        changed = sorted(k for k in fixed if res["settings"].get(k) != fixed[k])
        sys.exit(f"{out} holds runs made with other settings ({', '.join(changed)}): use another --out")
    res["settings"], res["config"] = fixed, vars(args)
    res["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads()}

    def save():
        atomic_write_json(out, res)

    pool = load_records(DataConfig(source="gsm8k", path=str(assets / "data/gsm8k/train.jsonl"), max_per_task=None))
    test_pool = load_records(DataConfig(source="gsm8k", path=str(assets / "data/gsm8k/test.jsonl"), max_per_task=None))
    random.Random(1234).shuffle(test_pool)
    target, tokenizer = load_base(args.target, where="--target")
    proxy_base, _ = load_base(args.proxy, where="--proxy")
    pad = tokenizer.pad_token_id
    eos = {tokenizer.eos_token_id}
    test_ds = tokenize_records(test_pool[: args.test * 2], tokenizer, args.max_length).subset(range(args.test))
    refs = [r.output for r in test_ds.records[: args.generate]]
    prompts = [test_ds.input_ids[i][: test_ds.prompt_lens[i]] for i in range(args.generate)]
    res["test"] = {"records": len(test_ds), "response_tokens": test_ds.num_target_tokens(),
                   "generation_prompts": len(prompts)}
    Console().print(render_example(test_ds, 0, tokenizer))

    if len(pool) < args.train + args.val or len(test_ds) < args.test:
        sys.exit(f"GSM8K has {len(pool)} train records (need {args.train + args.val}) and {len(test_ds)} test "
                 f"records that fit {args.max_length} tokens (need {args.test})")

    def data(seed: int):
        recs = list(pool)
        random.Random(seed).shuffle(recs)
        return recs[: args.train], tokenize_records(recs[args.train: args.train + args.val], tokenizer, args.max_length)

    def adapter(kind: str, seed: int, lr: float):
        """The trained PEFT model of ``kind`` (proxy or target) at ``seed`` and ``lr``, trained once."""
        base = proxy_base if kind == "proxy" else target
        folder = work / f"seed{seed}" / f"{kind}_lr{lr:g}"
        key = f"{kind}/seed{seed}/lr{lr:g}"
        if not (folder / "adapter_config.json").exists():
            train, _ = data(seed)
            t0 = time.perf_counter()
            trained = train_adapter(str(args.proxy if kind == "proxy" else args.target), train,
                                    AdapterTraining(rank=8, lora_alpha=16, steps=args.steps, lr=lr, batch_size=4,
                                                    max_length=args.max_length, seed=seed),
                                    out_dir=folder, base=base, tokenizer=tokenizer, log=print)
            model = trained.slot.model
            res.setdefault("training", {})[key] = {**trained.summary, "wall_s": round(time.perf_counter() - t0, 1)}
            save()
        else:
            model = PeftModel.from_pretrained(base, str(folder))
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    def unload(model):
        model.unload()

    def no_lora(*models):
        """The shared bases carry no adapter (PEFT attaches in place; ``unload`` must have removed it)."""
        for m in models:
            assert not any("lora_" in n for n, _ in m.named_parameters()), "an adapter is still attached"

    # 1. choices on validation at the first seed
    s0 = seeds[0]
    _, val0 = data(s0)
    for kind in ("proxy", "target"):
        if kind in res["choices"]:
            continue
        vals: dict[str, float] = {}
        grid = sorted(lrs)
        for _ in range(1 + args.max_extend):
            for lr in grid:
                if f"{lr:g}" not in vals:
                    m = adapter(kind, s0, lr)
                    vals[f"{lr:g}"] = mean_nll(per_record_nll(val0, pad, model_logits(m)))
                    print(f"   {kind} lr {lr:g}: validation NLL {vals[f'{lr:g}']:.4f}", flush=True)
                    unload(m)
            best_lr = min(grid, key=lambda x: vals[f"{x:g}"])
            if best_lr == grid[-1]:  # the best is at an edge of the grid: extend it there
                grid.append(grid[-1] * 2)
            elif best_lr == grid[0]:
                grid.insert(0, grid[0] / 2)
            else:
                break
        best = min(vals, key=vals.get)
        res["choices"][kind] = {"validation_nll_by_lr": vals, "lr": float(best)}
        save()
    if "alpha" not in res["choices"]:
        m = adapter("proxy", s0, res["choices"]["proxy"]["lr"])
        vals = combined_loss(target, ProxyPair(m), val0, pad, alphas)
        res["choices"]["alpha"] = {"validation_nll_by_alpha": {f"{a:g}": v for a, v in vals.items()},
                                   "alpha": min(vals, key=vals.get)}
        with torch.no_grad():
            res["choices"]["target_alone_validation_nll"] = mean_nll(per_record_nll(val0, pad, model_logits(target)))
        print(f"   alpha: {res['choices']['alpha']}", flush=True)
        unload(m)
        save()
    alpha = res["choices"]["alpha"]["alpha"]

    # 2. test scores per seed
    generate_seeds = {int(x) for x in args.generate_seeds.split(",") if x.strip()}

    def score(key: str, fn_nll, fn_gen, seed: int | None = None):
        if key in res["runs"]:
            return
        t0 = time.perf_counter()
        rows = per_record_nll(test_ds, pad, fn_nll)
        t1 = time.perf_counter()
        run = {"test_nll": mean_nll(rows), "per_record": rows, "nll_s": round(t1 - t0, 1)}
        if seed is None or seed in generate_seeds:
            texts = fn_gen()
            em = gsm8k_exact_match(texts, refs)
            run.update(rouge_l=generation_metrics(texts, refs)["rouge_l"], exact_match=sum(em) / len(em),
                       exact_match_per_prompt=em, texts=texts, generate_s=round(time.perf_counter() - t1, 1))
        res["runs"][key] = run
        gen = (f", exact match {sum(run['exact_match_per_prompt']):.0f}/{len(refs)}, ROUGE-L {run['rouge_l']:.4f}"
               if "texts" in run else "")
        print(f"   {key}: test NLL {run['test_nll']:.4f}{gen} ({time.perf_counter() - t0:.0f}s)", flush=True)
        save()

    no_lora(target, proxy_base)
    score("target alone", model_logits(target),
          lambda: generate_all("target alone", target, None, 0.0, prompts, args.max_new_tokens, eos, tokenizer))
    for seed in seeds:
        no_lora(target)
        pm = adapter("proxy", seed, res["choices"]["proxy"]["lr"])
        pair = ProxyPair(pm)
        score(f"proxy + LoRA/seed{seed}", model_logits(pm),
              lambda: generate_all("proxy + LoRA", None, pair, 0.0, prompts, args.max_new_tokens, eos, tokenizer), seed)
        score(f"Prada/seed{seed}", prada_logits(target, pair, alpha),
              lambda: generate_all("Prada", target, pair, alpha, prompts, args.max_new_tokens, eos, tokenizer), seed)
        unload(pm)
        tm = adapter("target", seed, res["choices"]["target"]["lr"])
        score(f"target + LoRA/seed{seed}", model_logits(tm),
              lambda: generate_all("target + LoRA", tm, None, 0.0, prompts, args.max_new_tokens, eos, tokenizer), seed)
        unload(tm)
    res["references"] = refs
    res["command"] = "python " + " ".join(sys.argv)
    save()
    summarize(res)


def summarize(res: dict) -> None:
    runs = res.get("runs", {})
    if not runs:
        print("no runs yet")
        return
    seeds = sorted({k.split("/seed")[1] for k in runs if "/seed" in k}, key=int)
    print(f"choices: {json.dumps(res.get('choices', {}))}")
    print("\n| system | test NLL per response token | exact match (final number) | ROUGE-L |\n|---|---|---|---|")
    per_seed: dict[str, dict[str, list[float]]] = {}
    for system in SYSTEMS:
        keys = [system] if system == "target alone" else [f"{system}/seed{s}" for s in seeds if f"{system}/seed{s}" in runs]
        if not keys:
            continue
        cols = {m: [runs[k][m] for k in keys if m in runs[k]] for m in ("test_nll", "exact_match", "rouge_l")}
        per_seed[system] = cols
        cells = []
        for m in ("test_nll", "exact_match", "rouge_l"):
            if not cols[m]:
                cells.append("–")
                continue
            mean, half = mean_ci(cols[m])
            n = f" ({len(cols[m])} seed{'s' if len(cols[m]) > 1 else ''})" if m != "test_nll" else ""
            cells.append((f"{mean:.4f}" if len(cols[m]) == 1 else f"{mean:.4f} ± {half:.4f}") + n)
        print(f"| {system} | " + " | ".join(cells) + " |")
    if "Prada" in per_seed:
        base = runs["target alone"]["test_nll"]
        print("\nPaired, per seed (test NLL):")
        for other in ("target + LoRA", "proxy + LoRA"):
            if other in per_seed and len(per_seed[other]["test_nll"]) == len(per_seed["Prada"]["test_nll"]):
                d = [p - o for p, o in zip(per_seed["Prada"]["test_nll"], per_seed[other]["test_nll"])]
                mean, half = mean_ci(d)
                print(f"  Prada - {other}: {mean:+.4f} ± {half:.4f}")
        d = [p - base for p in per_seed["Prada"]["test_nll"]]
        mean, half = mean_ci(d)
        print(f"  Prada - target alone: {mean:+.4f} ± {half:.4f}")
        if "target + LoRA" in per_seed:
            gain = [base - t for t in per_seed["target + LoRA"]["test_nll"]]
            got = [base - p for p in per_seed["Prada"]["test_nll"]]
            share = [g / w for g, w in zip(got, gain)]
            mean, half = mean_ci(share)
            print(f"  share of the white-box gain Prada recovers: {mean:.3f} ± {half:.3f}")


if __name__ == "__main__":
    main()
