"""Prada traffic on a real pair: what crosses the wire per generated token, by decoder.

Target (the black box): SmolLM2-135M-Instruct (vocabulary 49,152), served by a real
``mira serve`` process (one thread). Proxy (the device, one thread, in this process): a
shrunk SmolLM2 with its LoRA adapter (``mira proxy shrink`` + ``mira proxy train``; see
docs/prada.md). Prompts: GSM8K test questions in the Alpaca template, as the adapter was
trained. Greedy, ``alpha`` 1, a fixed number of new tokens (EOS ignored, so that every
run generates the same count).

Modes (each on every prompt):

* ``per-token``: ``/v1/logits`` per token, full float32 logits (the baseline);
* ``speculative``: stateless ``/v1/draft``, full float32 logits;
* ``session``: ``speculative`` over a server session (KV cache kept, only new tokens sent),
  full float32 logits;
* ``session+topk-f16`` / ``session+topk-q8``: the same with the top-k log-probabilities
  (k = ``--top-k``, plus one entry marking the support's boundary) in float16 or int8.

Per generated token: round trips, body and header bytes each way, server CPU seconds
(``/proc`` of the server process), client CPU seconds (this process: proxy, JSON, HTTP)
and wall seconds. Full-logit modes must give identical tokens; so must the two top-k modes,
and ``--check-topk`` prompts are also run ``per-token`` in top-k mode (float32) as the
reference. ``session_gap`` is the largest |session-cache row - canonical row| measured on
the target (logits), the quantity ``exact_margin`` must bound.

    MIRA_ASSETS=/work/shared .venv/bin/python benchmarks/prada_traffic.py \\
        --proxy runs/prada_smol/proxy7 --adapter runs/prada_smol/adapter7
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MIRA_THREADS", "1")

import torch  # noqa: E402

from prada_experiment import ServerProcess  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prada_traffic.json"

MODES = {
    "per-token": dict(mode="per-token"),
    "speculative": dict(mode="speculative"),
    "session": dict(mode="session"),
    "session+topk-f16": dict(mode="session", top_k=True, encoding="f16"),
    "session+topk-q8": dict(mode="session", top_k=True, encoding="q8"),
}


def session_gap(client, prompts: list[list[int]], n: int) -> dict:
    """max |cached - canonical| over session rows: a prefill draft, then a rollback + chunk."""
    gap, rows = 0.0, 0
    for prompt in prompts:
        sid, draft = client.open_session(prompt, n)
        seq = list(prompt)
        for i in range(1, len(draft.tokens)):
            seq.append(draft.tokens[i - 1])
            canon = client.logits([seq]).values[0]
            gap = max(gap, float((draft.scores.values[i] - canon).abs().max()))
            rows += 1
        kept = draft.tokens[:2] + [draft.tokens[2] + 1, draft.tokens[3]]  # roll back, then feed a chunk of 2
        again = client.session_draft(sid, kept, n // 2)
        seq = list(prompt) + kept
        for i in range(len(again.tokens)):
            canon = client.logits([seq]).values[0]
            gap = max(gap, float((again.scores.values[i] - canon).abs().max()))
            rows += 1
            seq.append(again.tokens[i])
        client.close_session(sid)
    return {"max_abs_logit_gap": gap, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--gsm8k", default=str(Path(os.environ.get("MIRA_ASSETS", "/work/shared")) / "data/gsm8k/test.jsonl"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--draft-max", type=int, default=16)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--check-topk", type=int, default=1, help="prompts also run per-token in top-k mode")
    ap.add_argument("--gap-prompts", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--workdir", default="runs/prada_traffic")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["MIRA_THREADS"]))

    from mira.config import DataConfig
    from mira.data.records import load_records
    from mira.prada.client import BlackBoxClient
    from mira.prada.decoding import DecodeSettings, DraftSchedule, make_decoder, prompt_ids
    from mira.prada.offset import ProxyPair

    t_start = time.perf_counter()
    pair, tok = ProxyPair.load(args.proxy, args.adapter)
    records = load_records(DataConfig(source="gsm8k", path=args.gsm8k, max_per_task=None))[: args.prompts]
    prompts = [prompt_ids(tok, r.instruction, r.input) for r in records]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"target": args.target, "proxy": args.proxy, "adapter": args.adapter,
                 "proxy_parameters": sum(p.numel() for p in pair.model.base_model.model.parameters()),
                 "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "new_tokens": args.new_tokens,
                 "top_k": args.top_k, "alpha": args.alpha, "draft_max": args.draft_max,
                 "threads": {"server": 1, "client": torch.get_num_threads()},
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                             "torch": torch.__version__, "note": "2 CPU cores shared with other jobs"},
                 "modes": {}}
    with ServerProcess(Path(args.target), work / "server.log") as server, \
            BlackBoxClient(server.url, server.key, timeout=300) as client:
        health = client.health()
        assert health.vocab_size == pair.vocab_size, (health.vocab_size, pair.vocab_size)
        out["vocab_size"] = health.vocab_size
        # warm both sides (first-call allocations), not counted
        make_decoder("session", client, pair, tok, eos_ids=set()).generate(prompts[0], DecodeSettings(max_new_tokens=2))
        tokens: dict[str, list[list[int]]] = {}
        runs = [(name, MODES[name], prompts) for name in args.modes.split(",")]
        if args.check_topk:
            runs.append(("per-token+topk-f32", dict(mode="per-token", top_k=True), prompts[: args.check_topk]))
        for name, spec, batch in runs:
            settings = DecodeSettings(max_new_tokens=args.new_tokens, alpha=args.alpha,
                                      top_k=args.top_k if spec.get("top_k") else None, encoding=spec.get("encoding"),
                                      draft=DraftSchedule(initial=4, minimum=1, maximum=args.draft_max,
                                                          rule="rate" if spec["mode"] == "session" else "double"))
            per_prompt = []
            tokens[name] = []
            for prompt in batch:
                decoder = make_decoder(spec["mode"], client, pair, tok, eos_ids=set())
                s0, c0, w0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
                gen = decoder.generate(prompt, settings)
                s1, c1, w1 = server.cpu_seconds(), time.process_time(), time.perf_counter()
                m = gen.metrics.to_dict()
                m.update(server_cpu_s=s1 - s0, client_cpu_s=c1 - c0, wall_s=w1 - w0)
                per_prompt.append(m)
                tokens[name].append(gen.token_ids)
                print(f"{name}: {m['new_tokens']} tokens, {m['round_trips']} trips, "
                      f"{m['bytes_received'] + m['header_bytes_received']:,} B down, server {m['server_cpu_s']:.1f}s, "
                      f"client {m['client_cpu_s']:.1f}s, acceptance {m['acceptance_rate']}, "
                      f"fallbacks {m['fallbacks']}", flush=True)
            n = sum(m["new_tokens"] for m in per_prompt)
            tot = {k: sum(m[k] for m in per_prompt) for k in ("round_trips", "bytes_sent", "bytes_received",
                                                               "header_bytes_sent", "header_bytes_received",
                                                               "server_cpu_s", "client_cpu_s", "wall_s", "drafted",
                                                               "accepted", "fallbacks", "reopened")}
            out["modes"][name] = {
                "prompts": len(batch), "new_tokens": n, "totals": tot,
                "per_token": {
                    "round_trips": tot["round_trips"] / n,
                    "bytes_up": (tot["bytes_sent"] + tot["header_bytes_sent"]) / n,
                    "bytes_down": (tot["bytes_received"] + tot["header_bytes_received"]) / n,
                    "body_bytes_up": tot["bytes_sent"] / n, "body_bytes_down": tot["bytes_received"] / n,
                    "header_bytes": (tot["header_bytes_sent"] + tot["header_bytes_received"]) / n,
                    "server_cpu_s": tot["server_cpu_s"] / n, "client_cpu_s": tot["client_cpu_s"] / n,
                    "wall_s": tot["wall_s"] / n},
                "acceptance_rate": tot["accepted"] / tot["drafted"] if tot["drafted"] else None,
                "runs": per_prompt}
        full = [k for k in ("per-token", "speculative", "session") if k in tokens]
        topk = [k for k in tokens if "topk" in k]
        out["identical_tokens"] = {
            "full_logit_modes": all(tokens[k] == tokens[full[0]] for k in full) if full else None,
            "topk_modes": all(tokens[k][: len(tokens[topk[0]])] == tokens[topk[0]][: len(tokens[k])] for k in topk)
            if topk else None,
            "topk_vs_full_same_tokens": (sum(a == b for k in topk for t, f in zip(tokens[k], tokens[full[0]])
                                             for a, b in zip(t, f)),
                                         sum(len(t) for k in topk for t in tokens[k])) if topk and full else None}
        base = out["modes"].get("per-token")
        if base:
            b = base["per_token"]
            for name, mode in out["modes"].items():
                p = mode["per_token"]
                mode["reduction_vs_per_token"] = {
                    "round_trips": 1 - p["round_trips"] / b["round_trips"],
                    "bytes_total": 1 - (p["bytes_up"] + p["bytes_down"]) / (b["bytes_up"] + b["bytes_down"]),
                    "bytes_up": 1 - p["bytes_up"] / b["bytes_up"], "bytes_down": 1 - p["bytes_down"] / b["bytes_down"],
                    "server_cpu": 1 - p["server_cpu_s"] / b["server_cpu_s"] if b["server_cpu_s"] else None}
        if args.gap_prompts:
            out["session_gap"] = session_gap(client, prompts[: args.gap_prompts], 12)
            print("session gap", out["session_gap"], flush=True)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print_table(out)


def print_table(out: dict) -> None:
    print("\n| mode | round trips | bytes up | bytes down | server CPU s | client CPU s | acceptance | "
          "vs per-token: trips, bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in out["modes"].items():
        p, r = m["per_token"], m.get("reduction_vs_per_token", {})
        acc = "—" if m["acceptance_rate"] is None else f"{m['acceptance_rate']:.2f}"
        red = f"{-100 * r['round_trips']:+.0f}%, {-100 * r['bytes_total']:+.1f}%" if r else "—"
        print(f"| {name} | {p['round_trips']:.3f} | {p['bytes_up']:,.0f} | {p['bytes_down']:,.0f} | "
              f"{p['server_cpu_s']:.3f} | {p['client_cpu_s']:.3f} | {acc} | {red} |")
    print(json.dumps(out["identical_tokens"]))


if __name__ == "__main__":
    main()
