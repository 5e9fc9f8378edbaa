"""Peak memory of ``mira.merge``: 8 random Llama models merged with linear and ties.

Builds a random Llama base (about 34M parameters, 130 MiB in float32) and 8 "fine-tunes"
(the base plus Gaussian noise) in a temporary folder, then runs each merge in a fresh
subprocess and records that process's peak resident set size (``VmHWM`` from
``/proc/self/status``; ``ru_maxrss`` elsewhere) next to its resident size just before
merging (Python, torch and mira imported). For comparison it also runs a naive merge that
loads all 8 models into memory and averages them.

Each merge runs twice: with glibc's default allocator, and with
``MALLOC_MMAP_THRESHOLD_=1048576``, which makes glibc return every freed block of 1 MiB or
more to the system at once. By default glibc raises its mmap threshold after large blocks
are freed and then keeps freed tensors' memory in its heap, so the default peak includes
memory the merge has already released; the second figure is the peak of live tensors.

``ru_maxrss`` is not used on Linux because it survives ``exec``: a child started by a
process that once held a lot of memory reports the parent's peak. The models are built in
a subprocess too, so the parent stays small.

    python benchmarks/merge_memory.py                 # prints a table, writes the JSON below
    python benchmarks/merge_memory.py --models 4 --layers 4 --keep --workdir /tmp/mm

Results go to ``benchmarks/results/merge_memory.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "merge_memory.json"
MB = 2**20


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                       tie_word_embeddings=False)


def build_models(root: Path, count: int, layers: int) -> tuple[Path, list[Path], int, int, int]:
    """A random base and ``count`` noisy copies.

    Returns the base, the models, and per model: parameters, bytes, bytes of the largest tensor.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(layers))
    base.save_pretrained(root / "base")
    state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
    parameters = sum(v.numel() for v in state.values())
    size = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    models = []
    for i in range(count):
        folder = root / f"model{i}"
        folder.mkdir()
        shutil.copy(root / "base" / "config.json", folder / "config.json")
        noisy = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
        save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
        models.append(folder)
        del noisy
    return root / "base", models, parameters, size, largest


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child(spec: dict) -> dict:
    """Run one task (build the models, or one merge) in this fresh process."""
    import psutil
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["task"] == "build":
        base, models, parameters, size, largest = build_models(Path(spec["root"]), spec["count"], spec["layers"])
        return {"base": str(base), "models": [str(m) for m in models], "parameters": parameters, "bytes": size,
                "largest_tensor_bytes": largest}
    from mira.merge import merge

    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    if spec["method"] == "naive-linear":
        from safetensors.torch import load_file, save_file

        states = [load_file(Path(m) / "model.safetensors") for m in spec["models"]]
        merged = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
        os.makedirs(spec["out"])
        save_file(merged, Path(spec["out"]) / "model.safetensors", metadata={"format": "pt"})
    else:
        recipe = {"merge_method": spec["method"], "models": spec["models"], "parameters": spec["parameters"]}
        if spec.get("base_model"):
            recipe["base_model"] = spec["base_model"]
        merge(recipe, spec["out"], max_shard_mb=spec["shard_mb"])
    seconds = time.perf_counter() - started
    return {"rss_before_merge": before, "peak_rss": peak_rss(), "seconds": seconds}


ALLOCATORS = {"default": {}, "mmap_threshold_1MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def run(spec: dict, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         check=False, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{spec.get('method', spec['task'])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shard-mb", type=float, default=64.0, help="output shard size (MiB)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the models (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    root = Path(tempfile.mkdtemp(prefix="merge-memory-", dir=args.workdir))
    load_before = os.getloadavg()  # timings mean little on a busy machine
    try:
        t0 = time.perf_counter()
        built = run({"task": "build", "root": str(root), "count": args.models, "layers": args.layers,
                     "threads": args.threads})
        base, models, parameters, size = built["base"], built["models"], built["parameters"], built["bytes"]
        print(f"built {args.models} models + base: {parameters / 1e6:.1f}M parameters, {size / MB:.0f} MiB each "
              f"(float32; largest tensor {built['largest_tensor_bytes'] / MB:.0f} MiB), "
              f"in {time.perf_counter() - t0:.0f} s")
        common = {"task": "merge", "models": models, "threads": args.threads, "shard_mb": args.shard_mb}
        runs = {
            "linear": {"parameters": {}},
            "ties": {"parameters": {"density": 0.2}, "base_model": base},
            "naive-linear": {"parameters": {}},
        }
        results = []
        for (method, extra), (allocator, env) in itertools.product(runs.items(), ALLOCATORS.items()):
            out_dir = root / f"out-{method}-{allocator}"
            stats = run({**common, **extra, "method": method, "out": str(out_dir)}, env)
            shutil.rmtree(out_dir, ignore_errors=True)
            row = {
                "method": method,
                "allocator": allocator,
                "peak_rss_mib": round(stats["peak_rss"] / MB, 1),
                "rss_before_merge_mib": round(stats["rss_before_merge"] / MB, 1),
                "merge_memory_mib": round((stats["peak_rss"] - stats["rss_before_merge"]) / MB, 1),
                "merge_memory_in_models": round((stats["peak_rss"] - stats["rss_before_merge"]) / size, 2),
                "seconds": round(stats["seconds"], 1),
            }
            results.append(row)
            print(f"{method:>13} ({allocator:>18}): peak RSS {row['peak_rss_mib']:7.1f} MiB = "
                  f"{row['rss_before_merge_mib']:.0f} MiB before merging + {row['merge_memory_mib']:6.1f} MiB "
                  f"({row['merge_memory_in_models']:.2f} x one model), {row['seconds']:.1f} s")
        report = {
            "command": " ".join(["python", "benchmarks/merge_memory.py", *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": __import__("torch").__version__, "torch_threads": args.threads,
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]},
            "model": {"parameters": parameters, "bytes": size, "mib": round(size / MB, 1),
                      "largest_tensor_mib": round(built["largest_tensor_bytes"] / MB, 1),
                      "config": {k: getattr(llama_config(args.layers), k) for k in
                                 ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}},
            "num_models": args.models,
            "output_shard_mib": args.shard_mb,
            "ties_density": 0.2,
            "runs": results,
            "notes": "peak_rss is VmHWM of a fresh process; merge_memory = peak_rss - rss_before_merge "
                     "(the process after importing torch and mira). naive-linear loads every model into memory. "
                     "allocator mmap_threshold_1MiB: MALLOC_MMAP_THRESHOLD_=1048576, so freed tensors are "
                     "returned to the system at once (the peak of live tensors).",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
