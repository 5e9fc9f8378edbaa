"""Performance of the federated engine on stories260K with 8 clients (issue 2's four goals).

1. engine overhead: round wall time / summed pure training-step time (goal <= 1.05);
2. memory: peak RSS with 8 vs 64 clients, same data and work (goal: growth <= adapters + 10%);
3. training throughput (tokens/s) of mira's client update vs a bare PyTorch + PEFT loop on
   the same batches (goal >= 0.95);
4. bytes per client per round vs raw adapter bytes (goal <= 1.02), and the 16-bit wire format.

Usage: MIRA_ASSETS=../shared .venv/bin/python benchmarks/core_perf.py [--out benchmarks/results/core_perf.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MIRA_THREADS", "1")


def base_config(k: int, rounds: int = 3, per_round: int = 8) -> dict:
    assets = os.environ["MIRA_ASSETS"]
    return {
        "seed": 0,
        "model": {"path": f"{assets}/models/stories260K"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"source": "dolly", "path": f"{assets}/data/dolly-15k/databricks-dolly-15k.jsonl",
                 "max_per_task": 160, "max_length": 96},
        "partition": {"name": "iid", "num_clients": k, "test_fraction": 0.1},
        "federation": {"rounds": rounds, "fraction": per_round / k, "local_steps": 10, "batch_size": 8, "lr": 0.003},
        "algorithm": {"name": "mira", "graph": "uniform", "lambda": 0.01},
        "eval": {"every": rounds},
        "plots": False,
    }


def run_engine(raw: dict, out: str) -> dict:
    from mira.config import validate
    from mira.federated.engine import Engine, Workspace

    cfg = validate(raw)
    ws = Workspace.load(cfg)
    return Engine(ws, cfg, out).run()


def overhead_and_bytes(tmp: Path) -> dict:
    s32 = run_engine(base_config(8, rounds=4), str(tmp / "k8"))
    rounds = json.loads((tmp / "k8" / "rounds.json").read_text())
    ratios = [e["round_time_s"] / e["train_step_time_s"] for e in rounds]
    raw16 = base_config(8, rounds=1)
    raw16["federation"]["wire_dtype"] = "float16"
    s16 = run_engine(raw16, str(tmp / "k8-fp16"))
    transfers = 4 * 8
    return {
        "overhead_per_round": ratios,
        "overhead_mean": sum(ratios) / len(ratios),
        "bytes_per_client_per_round_up": s32["bytes_up"] / transfers,
        "raw_adapter_bytes": s32["adapter_bytes"],
        "bytes_ratio": s32["bytes_up"] / transfers / s32["adapter_bytes"],
        "fp16_bytes_per_client_per_round": s16["bytes_up"] / 8,
        "fp16_ratio_to_fp32": (s16["bytes_up"] / 8) / (s32["bytes_up"] / transfers),
    }


def throughput() -> dict:
    """mira's client update vs a bare PyTorch + PEFT loop, same model, batches and optimiser."""
    import torch
    from peft import get_peft_model

    from mira.config import validate
    from mira.data.prompts import collate
    from mira.federated.client import client_fit
    from mira.federated.engine import Workspace, train_settings
    from mira.federated.strategies.base import FitIns
    from mira.models.adapters import lora_settings_to_peft
    from mira.models.loader import load_base
    from mira.train.trainer import LocalTrainer, batch_indices

    cfg = validate(base_config(8))
    ws = Workspace.load(cfg)
    ds = ws.train[0]
    steps, reps = 40, 5
    trainer = LocalTrainer(ws.slot, ws.tokenizer.pad_token_id, train_settings(cfg))
    batches = batch_indices(len(ds), 8, steps, seed=1)
    tokens = sum(int(collate(ds, b, 0)["attention_mask"].sum()) for b in batches)

    base, _ = load_base(cfg.model.path)
    torch.manual_seed(0)
    bare = get_peft_model(base, lora_settings_to_peft(base, 8, 16, 0.0, None))

    def bare_loop():
        params = [p for n, p in bare.named_parameters() if "lora_" in n]
        opt = torch.optim.AdamW(params, lr=0.003)
        bare.train()
        for idx in batches:
            loss = bare(**collate(ds, idx, 0)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

    def mira_update():
        client_fit(ws.slot, trainer, ds, FitIns(adapter=ws.slot.initial_state), seed=1, steps=steps)

    times = {"bare": [], "mira": []}
    for _ in range(reps):  # interleaved, so load changes hit both alike
        for name, fn in (("bare", bare_loop), ("mira", mira_update)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    return {"tokens_per_update": tokens, "steps": steps,
            "bare_tokens_per_s": tokens / best["bare"], "mira_tokens_per_s": tokens / best["mira"],
            "ratio": best["bare"] / best["mira"], "times_s": times}


def vm_hwm_kb() -> int:
    """Peak RSS of this process from /proc (``ru_maxrss`` would carry over the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_child(k: int, out: str) -> None:
    run_engine(base_config(k, rounds=2), out)
    print(json.dumps({"k": k, "peak_rss_kb": vm_hwm_kb()}))


def memory(tmp: Path) -> dict:
    res = {}
    for k in (8, 64):
        out = subprocess.run([sys.executable, __file__, "--child", str(k), "--child-out", str(tmp / f"mem{k}")],
                             capture_output=True, text=True, check=True)
        res[k] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_kb"] * 1024
    s = json.loads((tmp / "mem8" / "summary.json").read_text())
    adapters_growth = (64 - 8) * s["adapter_bytes"]
    growth = res[64] - res[8]
    return {"peak_rss_8": res[8], "peak_rss_64": res[64], "growth_bytes": growth,
            "adapter_bytes_of_56_more_clients": adapters_growth, "budget_bytes": 1.1 * adapters_growth,
            "within_goal": growth <= 1.1 * adapters_growth}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/core_perf.json")
    ap.add_argument("--child", type=int)
    ap.add_argument("--child-out")
    ap.add_argument("--parts", default="overhead,throughput,memory",
                    help="which measurements to (re)run; others are kept from an existing --out file")
    args = ap.parse_args()
    if args.child:
        peak_rss_child(args.child, args.child_out)
        return
    import tempfile

    parts = set(args.parts.split(","))
    result = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"MIRA_THREADS={os.environ['MIRA_THREADS']}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "overhead" in parts:
            result["overhead_and_bytes"] = overhead_and_bytes(tmp)
        if "throughput" in parts:
            result["throughput"] = throughput()
        if "memory" in parts:
            result["memory"] = memory(tmp)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
