"""Prada end to end: a black-box target corrected by a private proxy, against four baselines.

Steps (all on CPU, one thread):

1. build the models (``mira.prada.models.build_models``): a target grown from stories260K
   (10 layers, 0.82M parameters) and the proxy (stories260K itself, 0.26M), both briefly
   pre-trained on TinyStories + Dolly; reused from ``--workdir`` with ``--reuse-models``;
2. the private task: one Natural Instructions v1 task (default
   ``subtask040_qasc_question_generation``: turn a fact into a question), split into train
   and test records; the target never sees it;
3. LoRA on the proxy and, as the upper bound, LoRA on the target itself, both with
   ``mira.prada.train.train_adapter`` (the code behind ``mira proxy train``);
4. test loss (mean NLL per response token) of: target alone, proxy base, proxy+LoRA, Prada
   (target + offset, teacher-forced in process) and target+LoRA;
5. greedy generation on the test prompts, ROUGE-L and exact match, for the same five. Prada
   generates through a real ``mira serve`` process over HTTP, with the per-token and the
   speculative decoder (full logits and top-k), whose tokens must be identical; their round
   trips and body bytes are recorded.

    python benchmarks/prada_experiment.py --assets /work/shared            # full run
    python benchmarks/prada_experiment.py --assets /work/shared --reuse-models

Results go to ``benchmarks/results/prada_experiment.json``; a table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("MIRA_THREADS", "1")

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ["MIRA_THREADS"]))

RESULTS = Path(__file__).resolve().parent / "results" / "prada_experiment.json"


class Clock:
    """Wall and CPU seconds per phase."""

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.process_time()
                print(f"== {name}", flush=True)

            def __exit__(self, *exc):
                clock.phases[name] = {"wall_s": round(time.perf_counter() - self.t, 1),
                                      "cpu_s": round(time.process_time() - self.c, 1)}

        return _Phase()


# -- Prada's loss, teacher-forced ------------------------------------------------------------------
@torch.no_grad()
def combined_loss(target, pair, ds, pad_id: int, alphas: list[float], batch_size: int = 8) -> dict[float, float]:
    """Mean NLL per response token of ``softmax(z_target + alpha * offset)`` for each alpha."""
    from mira.data.prompts import IGNORE, collate
    from mira.prada.offset import add_offset

    totals = {a: 0.0 for a in alphas}
    count = 0
    order = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    for start in range(0, len(order), batch_size):
        batch = collate(ds, order[start:start + batch_size], pad_id)
        z_target = target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        offset = pair.teacher_forced_offsets(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:].reshape(-1)
        for a in alphas:
            z = add_offset(z_target, offset, a)[:, :-1].reshape(-1, z_target.size(-1))
            totals[a] += float(F.cross_entropy(z, labels, ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    return {a: totals[a] / count for a in alphas}


# -- the black-box server as a real process -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``mira serve TARGET`` on 127.0.0.1; killed on exit, whatever happens."""

    def __init__(self, model_dir: Path, log: Path):
        self.key = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "MIRA_API_KEY": self.key, "MIRA_THREADS": "1"}
        cmd = [sys.executable, "-c", "from mira.cli import entrypoint; entrypoint()", "serve", str(model_dir),
               "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--max-draft", "64"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.log = log

    def __enter__(self) -> ServerProcess:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-1000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 300s")
            time.sleep(0.2)

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (Linux ``/proc``; None elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def prada_generate(server: ServerProcess, pair, tokenizer, prompts: list[list[int]], max_new: int,
                   variants: dict[str, dict]) -> dict[str, dict]:
    """Generate every prompt with each decoder variant; totals of the traffic metrics."""
    from mira.prada.client import BlackBoxClient
    from mira.prada.decoding import DecodeSettings, DraftSchedule, make_decoder

    out: dict[str, dict] = {}
    with BlackBoxClient(server.url, server.key, timeout=120) as client:
        eos = set(client.health().eos_token_ids)
        for name, v in variants.items():
            decoder = make_decoder(v["mode"], client, pair, tokenizer, eos_ids=eos)
            settings = DecodeSettings(max_new_tokens=max_new, top_k=v.get("top_k"), alpha=v.get("alpha", 1.0),
                                      draft=DraftSchedule(initial=4, minimum=1, maximum=32))
            gens = [decoder.generate(p, settings) for p in prompts]
            total = {k: sum(getattr(g.metrics, k) for g in gens)
                     for k in ("new_tokens", "round_trips", "bytes_sent", "bytes_received", "seconds", "drafted",
                               "accepted")}
            total["tokens_per_second"] = total["new_tokens"] / total["seconds"]
            total["acceptance_rate"] = total["accepted"] / total["drafted"] if total["drafted"] else None
            total["bytes_total"] = total["bytes_sent"] + total["bytes_received"]
            out[name] = {"settings": v, "metrics": total, "texts": [g.text.strip() for g in gens],
                         "token_ids": [g.token_ids for g in gens]}
            print(f"   {name}: {total['new_tokens']} tokens, {total['round_trips']} round trips, "
                  f"{total['bytes_sent']:,} B sent, {total['bytes_received']:,} B received, "
                  f"{total['tokens_per_second']:.1f} tok/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", default=os.environ.get("MIRA_ASSETS", "../shared"))
    ap.add_argument("--workdir", default="runs/prada_experiment")
    ap.add_argument("--reuse-models", action="store_true", help="use WORKDIR/models if already built")
    ap.add_argument("--task", default="subtask040_qasc_question_generation")
    ap.add_argument("--train", type=int, default=1000, help="private training records")
    ap.add_argument("--test", type=int, default=64, help="test records for the loss")
    ap.add_argument("--generate", type=int, default=24, help="test prompts for generation")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lora-steps", type=int, default=80)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--target-steps", type=int, default=200)
    ap.add_argument("--proxy-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import mira.prada.client
    import mira.prada.decoding  # noqa: F401
    from mira.config import DataConfig
    from mira.data.prompts import tokenize_records
    from mira.data.records import load_records
    from mira.eval.metrics import eval_loss, generate, generation_metrics
    from mira.io import atomic_write_json
    from mira.prada.models import BuildSettings, PretrainSettings, build_models
    from mira.prada.offset import ProxyPair
    from mira.prada.train import AdapterTraining, train_adapter

    assets, work = Path(args.assets), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    t_all = time.perf_counter()

    # 1. models
    models = work / "models"
    with clock("build models"):
        if args.reuse_models and (models / "build.json").exists():
            print(f"   reusing {models}")
        else:
            defaults = BuildSettings()
            build_models(str(assets / "models/stories260K"), str(assets / "data/tinystories/tinystories_val.txt"),
                         str(assets / "data/dolly-15k/databricks-dolly-15k.jsonl"), models,
                         BuildSettings(target=PretrainSettings(args.target_steps, defaults.target.lr),
                                       proxy=PretrainSettings(args.proxy_steps, defaults.proxy.lr), seed=args.seed),
                         log=lambda m: print("   " + m, flush=True))
    build = json.loads((models / "build.json").read_text())

    # 2. the private task
    records = load_records(DataConfig(source="natural_instructions", path=str(assets / "data/natural-instructions-v1/tasks"),
                                      tasks=[args.task], max_per_task=None))
    random.Random(args.seed).shuffle(records)
    train, test = records[: args.train], records[args.train: args.train + args.test]
    print(f"   task {args.task}: {len(records)} records; {len(train)} train, {len(test)} test")

    # 3. LoRA on the proxy (the device) and on the target (upper bound), same trainer and settings
    lora = AdapterTraining(rank=8, lora_alpha=16, steps=args.lora_steps, lr=args.lora_lr, batch_size=8,
                           max_length=384, seed=args.seed)
    trained = {}
    for name in ("proxy", "target"):
        with clock(f"LoRA on the {name}"):
            trained[name] = train_adapter(str(models / name), train, lora, out_dir=work / f"{name}_adapter",
                                          log=lambda m: print("   " + m, flush=True))
    proxy_peft, target_peft = trained["proxy"].slot.model, trained["target"].slot.model
    tokenizer = trained["proxy"].tokenizer
    pad = tokenizer.pad_token_id
    pair = ProxyPair(proxy_peft)
    ds = tokenize_records(test, tokenizer, 384)
    gen_ds = ds.subset(range(min(args.generate, len(ds))))
    refs = [r.output for r in gen_ds.records]

    # 4. losses
    losses = {}
    with clock("test losses"):
        with target_peft.disable_adapter():
            losses["target alone"] = eval_loss(target_peft, ds, pad)[0]
            alphas = [0.5, 1.0, 1.5, 2.0]
            prada_losses = combined_loss(target_peft, pair, ds, pad, alphas)
        with proxy_peft.disable_adapter():
            losses["proxy base alone"] = eval_loss(proxy_peft, ds, pad)[0]
        losses["proxy + LoRA alone"] = eval_loss(proxy_peft, ds, pad)[0]
        losses["Prada (target + offset)"] = prada_losses[1.0]
        losses["target + LoRA (upper bound)"] = eval_loss(target_peft, ds, pad)[0]
    for k, v in losses.items():
        print(f"   {k}: {v:.4f}")

    # 5. generation
    gens: dict[str, list[str]] = {}
    with clock("generation in process"):
        with target_peft.disable_adapter():
            gens["target alone"] = generate(target_peft, tokenizer, gen_ds, args.max_new_tokens)
        with proxy_peft.disable_adapter():
            gens["proxy base alone"] = generate(proxy_peft, tokenizer, gen_ds, args.max_new_tokens)
        gens["proxy + LoRA alone"] = generate(proxy_peft, tokenizer, gen_ds, args.max_new_tokens)
        gens["target + LoRA (upper bound)"] = generate(target_peft, tokenizer, gen_ds, args.max_new_tokens)
    prompts = [gen_ds.input_ids[i][: gen_ds.prompt_lens[i]] for i in range(len(gen_ds))]
    variants = {"per-token": {"mode": "per-token"}, "speculative": {"mode": "speculative"},
                f"per-token top-{args.top_k}": {"mode": "per-token", "top_k": args.top_k},
                f"speculative top-{args.top_k}": {"mode": "speculative", "top_k": args.top_k}}
    with clock("Prada over HTTP"):
        with ServerProcess(models / "target", work / "server.log") as server:
            prada = prada_generate(server, pair, tokenizer, prompts, args.max_new_tokens, variants)
            server_cpu = server.cpu_seconds()
    gens["Prada (target + offset)"] = prada["per-token"]["texts"]
    identical = {"speculative == per-token": prada["speculative"]["token_ids"] == prada["per-token"]["token_ids"],
                 f"speculative top-{args.top_k} == per-token top-{args.top_k}":
                     prada[f"speculative top-{args.top_k}"]["token_ids"] == prada[f"per-token top-{args.top_k}"]["token_ids"]}
    topk_metrics = generation_metrics(prada[f"per-token top-{args.top_k}"]["texts"], refs)

    table = {name: {"test_loss": round(losses[name], 4), **{k: round(v, 4) for k, v in
                                                          generation_metrics(gens[name], refs).items()}}
             for name in losses}
    base_m = prada["per-token"]["metrics"]
    communication = {}
    for name, p in prada.items():
        m = p["metrics"]
        communication[name] = {**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()},
                               "round_trips_vs_per_token": round(m["round_trips"] / base_m["round_trips"], 4),
                               "bytes_vs_per_token": round(m["bytes_total"] / base_m["bytes_total"], 4)}
    result = {
        "task": args.task, "train_records": len(train), "test_records": len(test), "generation_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "lora": asdict(lora),
        "models": {k: {x: build[k][x] for x in ("parameters", "layers", "hidden", "intermediate", "pretrain",
                                                   "heldout_loss_before", "heldout_loss_after", "seconds",
                                                   "cpu_seconds") if x in build[k]} for k in ("target", "proxy")},
        "build_seconds": build.get("seconds"), "build_cpu_seconds": build.get("cpu_seconds"),
        "results": table, "prada_loss_by_alpha": {str(a): round(v, 4) for a, v in prada_losses.items()},
        f"prada_top{args.top_k}_generation": {k: round(v, 4) for k, v in topk_metrics.items()},
        "communication": communication, "identical_tokens": identical,
        "examples": [{"reference": refs[i], **{k: gens[k][i] for k in gens}} for i in range(min(4, len(refs)))],
        "phases": clock.phases, "total_wall_s": round(time.perf_counter() - t_all, 1),
        "total_cpu_s": {"experiment_process": round(time.process_time(), 1),
                        "server_process": None if server_cpu is None else round(server_cpu, 1),
                        "model_build (in the experiment process when built now)": build.get("cpu_seconds")},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "command": "python " + " ".join(sys.argv),
    }
    atomic_write_json(args.out, result)

    print("\n| system | test loss | ROUGE-L | exact match |\n|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['test_loss']:.4f} | {row['rouge_l']:.4f} | {row['exact_match']:.4f} |")
    print("\n| Prada decoder | round trips | bytes sent | bytes received | total vs per-token | tok/s | acceptance |")
    print("|---|---|---|---|---|---|---|")
    for name, m in communication.items():
        acc = f"{m['acceptance_rate']:.2f}" if m["acceptance_rate"] is not None else "-"
        print(f"| {name} | {m['round_trips']} | {m['bytes_sent']:,} | {m['bytes_received']:,} | "
              f"{m['bytes_vs_per_token']:.2f} | {m['tokens_per_second']:.1f} | {acc} |")
    print(f"\nidentical tokens: {identical}")
    print(f"phases: {clock.phases}")
    print(f"total {result['total_wall_s']}s wall; CPU {result['total_cpu_s']}; written {args.out}")


if __name__ == "__main__":
    main()
