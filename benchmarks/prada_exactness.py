"""How far apart are the two paths that compute the same next-token scores?

Speculative decoding reads draft rows computed with a KV cache; the per-token decoder (the
canonical computation) reads rows from one full forward of the whole prefix. This script
measures ``max |cached - full|`` on

* the target: ``grow_llama(stories260K, 10 layers, MLP 344)`` (the experiment's target
  architecture, computing stories260K's function), logits and log-probabilities;
* the proxy: stories260K with a LoRA adapter whose B matrices are random (so the offset is
  not zero), both sides of the offset (adapter on and off) and the offset itself.

For each prompt it greedily extends ``--steps`` tokens with the cache, and at every step
compares the cached row with a fresh full forward of the same prefix. Writes
``benchmarks/results/prada_exactness.json``.

    python benchmarks/prada_exactness.py --assets ../shared
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def cached_vs_full(model, prompts: list[list[int]], steps: int, ctx=None) -> dict:
    worst = {"logits": 0.0, "logprobs": 0.0}
    rows = 0
    with torch.no_grad():
        for prompt in prompts:
            seq = list(prompt)
            with ctx() if ctx else _null():
                out = model(input_ids=torch.tensor([seq]), use_cache=True)
            for _ in range(steps):
                cached = out.logits[0, -1].float()
                with ctx() if ctx else _null():
                    full = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                worst["logits"] = max(worst["logits"], float((cached - full).abs().max()))
                worst["logprobs"] = max(worst["logprobs"], float((torch.log_softmax(cached, -1)
                                                                  - torch.log_softmax(full, -1)).abs().max()))
                rows += 1
                token = int(cached.argmax())
                seq.append(token)
                with ctx() if ctx else _null():
                    out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return {**worst, "rows": rows}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default="../shared")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--out", default="benchmarks/results/prada_exactness.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mira.data.synthetic import generate_suite
    from mira.prada.decoding import prompt_ids
    from mira.prada.models import grow_llama

    src_dir = Path(args.assets) / "models" / "stories260K"
    tok = AutoTokenizer.from_pretrained(src_dir)
    src = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval()
    target = grow_llama(src, 10, 344)
    texts = ["Once upon a time", "The little girl", "Tom and his dog", "She wanted to", "One day a bird"]
    prompts = [prompt_ids(tok, t, template="raw") for t in texts]
    prompts += [prompt_ids(tok, r.instruction, r.input) for r in generate_suite(args.prompts - len(texts), seed=3)]
    prompts = prompts[: args.prompts]
    t0 = time.perf_counter()
    report = {"prompts": len(prompts), "steps": args.steps, "torch": torch.__version__, "threads": 1}
    report["target"] = cached_vs_full(target, prompts, args.steps)
    torch.manual_seed(0)
    proxy = get_peft_model(AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    for name, p in proxy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    proxy.eval()
    report["proxy_tuned"] = cached_vs_full(proxy, prompts, args.steps)
    report["proxy_base"] = cached_vs_full(proxy, prompts, args.steps, ctx=proxy.disable_adapter)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
