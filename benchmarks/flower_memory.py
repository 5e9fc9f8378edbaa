"""Flower memory benchmark: peak resident memory of the ServerApp, the SuperLink and the
SuperNode side for one round of a real federation whose adapter has a given size.

    nice -n 19 python benchmarks/flower_memory.py --sizes-mb 10,50,100 [--nodes 2] [--algorithm fedit]

It starts one SuperLink and ``--nodes`` warm SuperNodes on 127.0.0.1 (insecure;
``launch.LocalFederation``, the helpers the tests use), submits, for each size in turn, a run
of one round (fit + evaluation) and, while it runs, samples every process of the federation
(found by the federation's ``MIRA_FLOWER_TAG``, which Flower's own children inherit:
SuperExecs, ``flwr-serverapp``, ``flwr-clientapp``) every 0.1 s, reading ``VmHWM`` (the
kernel's peak RSS of the process, monotonic, so a sample missed between two reads loses
nothing except a spike in the last 0.1 s before a process exits) and ``VmRSS`` from
``/proc/PID/status``. The peaks of the long-lived processes (SuperLink, SuperNodes, workers)
are reset before each run (``/proc/PID/clear_refs``), so each run has its own. Processes are
grouped by role from their command line (serverapp, superlink, superexec, supernode,
clientapp, worker = the warm node worker that holds the model and trains) and a role's peak
is the largest of its processes.

How the adapter gets big. The model is ``builtin:demo`` (3-layer Llama, hidden 64), whose
default adapter (r=8 on q/v) is 21 KB. LoRA's size is linear in its rank: r x (in + out)
parameters per target module, so with all seven projections of every layer as targets an
adapter is exactly ``r x 14,592`` float32 bytes here, and the benchmark picks the rank that
reaches the requested size (r = 6,853 for 100 MB). PEFT accepts a rank above the layer
width, and nothing in mira or Flower depends on the rank except the tensor shapes, so the
messages, the server's decoding, aggregation, checkpoints and evaluation are the real ones,
with real tensors of the real size; only the training is unrealistic (1 local step, batch 1,
a rank larger than the width; the numbers it produces are meaningless, its memory is the
node's). No benchmark-only knob is needed. The tensors are few and large (21 per layer x 3
= 42 arrays), which is the worst case for per-tensor buffers and the best for per-tensor
overhead; a real model's adapter of the same size has more, smaller tensors.

Every size is run after a baseline run (the default r=8 adapter, about 0) so that the
fixed memory of each process (Python, torch, the model) can be subtracted: ``ratio`` is
peak / adapter size, ``marginal_ratio`` (peak - baseline peak) / adapter size, i.e. how many
copies of one adapter a process holds at its peak. Writes
``benchmarks/results/flower_memory.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MIRA_THREADS", "1")

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = {
    "seed": 0,
    "model": {"path": "builtin:demo"},
    "lora": {"r": 8, "alpha": 16},
    "data": {"source": "synthetic", "tasks": ["add", "upper", "reverse_words", "sub", "lower", "sort_digits"], "max_per_task": 12,
             "max_length": 64},
    "partition": {"name": "by_task", "test_size": 2},
    "federation": {"rounds": 1, "local_steps": 1, "batch_size": 1, "lr": 0.001},
    "algorithm": {"name": "fedit"},
    "eval": {"every": 1, "batch_size": 2},
    "plots": False,
}
MB = 1e6

# first match wins: the warm worker's command line names flower-supernode too (it supervises it)
ROLES = [("flwr-serverapp", "serverapp"), ("flwr-clientapp", "clientapp"), ("flower-superexec", "superexec"),
         ("flower-superlink", "superlink"), ("mira.federated.flower.worker", "worker"),
         ("mira.federated.flower.supernode", "supernode"), ("flower-supernode", "supernode"), ("flwr", "flwr-cli")]


def role_of(cmdline: str) -> str:
    for needle, role in ROLES:
        if needle in cmdline:
            return role
    return "other"


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Every ``period`` s: VmHWM/VmRSS of the federation's processes (new ones found by tag)."""

    def __init__(self, tag: str, period: float = 0.1, scan_every: float = 0.5):
        super().__init__(daemon=True)
        self.tag, self.period, self.scan_every = tag, period, scan_every
        self.procs: dict[int, dict] = {}  # pid -> {role, cmd, hwm_kb, rss_kb}
        self.stop = threading.Event()

    def run(self) -> None:
        from mira.federated.flower.launch import _cmdline, tagged_pids

        last_scan = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - last_scan >= self.scan_every:
                last_scan = now
                for pid in tagged_pids(self.tag):
                    if pid not in self.procs:
                        cmd = _cmdline(pid)
                        self.procs[pid] = {"role": role_of(cmd), "cmd": cmd[:160], "hwm_kb": 0, "rss_kb": 0}
            for pid, p in self.procs.items():
                s = _status_kb(pid)
                if s:
                    p["hwm_kb"] = max(p["hwm_kb"], s.get("VmHWM", 0))
                    p["rss_kb"] = max(p["rss_kb"], s.get("VmRSS", 0))
            self.stop.wait(self.period)

    def peaks(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for pid, p in self.procs.items():
            r = out.setdefault(p["role"], {"peak_mb": 0.0, "processes": 0})
            r["processes"] += 1
            r["peak_mb"] = max(r["peak_mb"], p["hwm_kb"] * 1024 / MB)
        return out


def bytes_per_rank(raw: dict) -> int:
    """float32 bytes of the adapter per unit of LoRA rank (exact: the size is linear in r)."""
    from mira.config import validate
    from mira.federated.flower.node import load_slot

    cfg = copy.deepcopy(raw)
    cfg["lora"]["r"] = 1
    _, slot = load_slot(validate(cfg))
    return sum(int(t.numel()) * 4 for t in slot.initial_state.values())


def reset_peaks(pids) -> None:
    """Reset the kernel's peak RSS (VmHWM) of long-lived processes we started (``clear_refs`` 5)."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def run_one(fed, raw: dict, work: Path) -> dict:
    """One run on the running federation ``fed``; peaks of this run's window only."""
    from mira.federated.flower import bundle
    from mira.federated.flower.launch import tagged_pids
    from mira.federated.flower.settings import RunSettings

    out = work / "run"
    reset_peaks(tagged_pids(fed.tag))
    sampler = Sampler(fed.tag)
    sampler.start()
    try:
        t0 = time.perf_counter()
        run_id = fed.submit(bundle.config_text(raw), RunSettings(out_dir=str(out)))
        info = fed.wait(run_id, timeout=3600)
        wall = time.perf_counter() - t0
        time.sleep(0.3)
        if info["status"] != "finished:completed":
            raise RuntimeError(f"run failed: {info}\n{fed.logs(run_id)[-3000:]}")
    finally:
        sampler.stop.set()
        sampler.join()
    summary = json.loads((out / "summary.json").read_text())
    rounds = json.loads((out / "rounds.json").read_text())
    return {"wall_s": wall, "round_s": [e["round_time_s"] for e in rounds], "peaks": sampler.peaks(),
            "adapter_bytes": summary["adapter_bytes"], "flower": summary.get("flower", {}),
            "flwr_ls": {k: info.get(k) for k in ("network-traffic", "compute-time", "elapsed")},
            "processes": list(sampler.procs.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="10,50,100", help="adapter sizes (float32, MB = 10^6 bytes)")
    ap.add_argument("--nodes", type=int, default=2, help="SuperNodes, one task each (at most 6)")
    ap.add_argument("--algorithm", default="fedit", help="mira strategy (fedit: FedAvg on LoRA, one global adapter)")
    ap.add_argument("--cold", action="store_true", help="Flower's default ClientApps instead of warm SuperNodes")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flower_memory.json"))
    args = ap.parse_args(argv)
    if not 1 <= args.nodes <= len(CFG["data"]["tasks"]):
        ap.error(f"--nodes must be in [1, {len(CFG['data']['tasks'])}] (one synthetic task per node)")
    sizes = [float(s) for s in args.sizes_mb.split(",") if s]
    base = copy.deepcopy(CFG)
    base["data"]["tasks"] = base["data"]["tasks"][:args.nodes]
    base["algorithm"]["name"] = args.algorithm
    big = copy.deepcopy(base)
    big["lora"]["target_modules"] = ALL_TARGETS
    per_r = bytes_per_rank(big)
    import flwr  # noqa: F401
    import importlib.metadata as md
    import torch

    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "flwr": md.version("flwr"), "loadavg_start": os.getloadavg(),
               "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9}
    plan = [] if args.no_baseline else [("baseline", base)]
    for mb in sizes:
        cfg = copy.deepcopy(big)
        cfg["lora"]["r"] = max(1, round(mb * MB / per_r))
        plan.append((f"{mb:g}MB", cfg))
    from mira.federated.flower.launch import LocalFederation

    tmp = Path(tempfile.mkdtemp(prefix="mira-flower-mem-"))
    rows = []
    fed = None
    try:
        for i, (label, cfg) in enumerate(plan):
            # a fresh federation per run: on flwr 1.42, a second or third run submitted to the same
            # SuperLink got ServerApps whose task token the SuperLink refused, in a loop
            if fed is not None:
                left = fed.close()
                assert not left, left
            fed = LocalFederation(tmp / f"fed{i}")
            fed.start_superlink()
            fed.start_supernodes(args.nodes, warm=not args.cold)
            r = run_one(fed, cfg, tmp / f"r{i}")
            r.update({"label": label, "lora_r": cfg["lora"]["r"], "target_modules": cfg["lora"].get("target_modules"),
                      "adapter_mb": r["adapter_bytes"] / MB, "loadavg": os.getloadavg()})
            rows.append(r)
            print(f"{label}: r={r['lora_r']} adapter {r['adapter_mb']:.1f} MB, wall {r['wall_s']:.0f} s, "
                  + ", ".join(f"{k} {v['peak_mb']:.0f} MB" for k, v in sorted(r["peaks"].items())), flush=True)
            shutil.rmtree(tmp / f"r{i}", ignore_errors=True)
    finally:
        left = fed.close() if fed is not None else []
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, left
    baseline = rows[0]["peaks"] if rows and rows[0]["label"] == "baseline" else {}
    for r in rows:
        size = r["adapter_mb"]
        for role, p in r["peaks"].items():
            p["ratio"] = p["peak_mb"] / size if size > 1 else None
            b = baseline.get(role, {}).get("peak_mb")
            p["marginal_ratio"] = (p["peak_mb"] - b) / size if b is not None and size > 1 else None
    machine["loadavg_end"] = os.getloadavg()
    doc = {"command": "nice -n 19 python benchmarks/flower_memory.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine, "nodes": args.nodes, "algorithm": args.algorithm, "warm": not args.cold,
           "bytes_per_rank": per_r, "config": base, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")

    roles = ["serverapp", "superlink", "superexec", "supernode", "clientapp", "worker"]
    print(f"\n{'run':>9} {'r':>5} {'MB':>6} {'wall s':>6} " + " ".join(f"{x + ' MB (x)':>20}" for x in roles))
    for r in rows:
        cells = []
        for role in roles:
            p = r["peaks"].get(role)
            if p is None:
                cells.append(f"{'-':>20}")
            else:
                m = p.get("marginal_ratio")
                cells.append(f"{p['peak_mb']:8.0f} ({'' if m is None else f'{m:+.2f}'})".rjust(20))
        print(f"{r['label']:>9} {r['lora_r']:5d} {r['adapter_mb']:6.1f} {r['wall_s']:6.0f} " + " ".join(cells))
    print("(x) = (peak - baseline peak) / adapter size: copies of one adapter held at the peak")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
