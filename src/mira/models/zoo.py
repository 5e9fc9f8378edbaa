"""Llama base models of several sizes, built from a config with stories260K's tokenizer.

``ensure_zoo_model(name, tokenizer_dir, corpus, cache)`` returns a cached Hugging Face
model folder. On first use it builds a ``LlamaForCausalLM`` from ``ZOO[name]`` (the
tokenizer files are copied from ``tokenizer_dir``, e.g. the stories260K folder, so every
size shares stories260K's 512-token vocabulary), pre-trains it briefly as a plain causal
LM on chunks of a text corpus (e.g. TinyStories), and saves it atomically (temporary
folder + rename). A second call with the same settings reuses the folder; the settings
are part of the folder name, so changing them builds a new one.

Sizes (stories260K: hidden 64, 5 layers, 8 heads, 4 KV heads, intermediate 172,
260,032 parameters, tied embeddings):

* ``x4``: hidden 128, 5 layers, intermediate 384, 8 heads / 4 KV heads -> 1,049,984 (4.04x)
* ``x16``: hidden 256, 5 layers, intermediate 792, 8 heads / 4 KV heads -> 4,158,208 (15.99x)
* ``x64``: hidden 512, 5 layers, intermediate 1376, 8 heads / 4 KV heads -> 14,767,616 (56.8x)
* ``x1``: stories260K's own architecture (260,032), pre-trained from scratch with the same brief
  recipe: a control that separates model size from pre-training quality

Only the width grows (depth, heads and vocabulary stay as in stories260K).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

VERSION = "v1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

# name -> LlamaConfig overrides (everything else as stories260K: vocab 512, tied embeddings, rope 1e4)
ZOO: dict[str, dict] = {
    "x1": {},  # stories260K's own architecture, pre-trained from scratch like the others (a control)
    "x4": {"hidden_size": 128, "num_hidden_layers": 5, "intermediate_size": 384,
           "num_attention_heads": 8, "num_key_value_heads": 4},
    "x16": {"hidden_size": 256, "num_hidden_layers": 5, "intermediate_size": 792,
            "num_attention_heads": 8, "num_key_value_heads": 4},
    "x64": {"hidden_size": 512, "num_hidden_layers": 5, "intermediate_size": 1376,
            "num_attention_heads": 8, "num_key_value_heads": 4},
}


def llama_config(vocab_size: int = 512, **overrides):
    from transformers import LlamaConfig

    kw = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
          "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    kw.update(overrides)
    return LlamaConfig(**kw)


def count_params(cfg) -> int:
    """Exact parameter count of a ``LlamaForCausalLM`` built from ``cfg`` (tied embeddings counted once)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in m.parameters())


def text_chunks(text: str, tokenizer, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """Stories separated by blank lines, each prefixed by BOS and ended by EOS, concatenated and cut into
    ``seq_len``-token rows."""
    stories = [s.strip() for s in text.split("\n\n") if s.strip()]
    ids: list[int] = []
    need = None if max_chunks is None else max_chunks * seq_len
    enc = tokenizer(stories, add_special_tokens=False)["input_ids"]
    for t in enc:
        ids += [tokenizer.bos_token_id] + t + [tokenizer.eos_token_id]
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"corpus too short for one chunk of {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def pretrain_lm(model, chunks: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
                max_seconds: float | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Full-parameter causal-LM pre-training on ``chunks`` (rows of token ids); the last 5% of rows are held out.

    Stops after ``steps`` steps or ``max_seconds`` (whichever first). Returns the loss curve,
    held-out loss before/after, steps done and seconds."""
    from mira.train.trainer import batch_indices

    n_val = max(1, len(chunks) // 20)
    val, train = chunks[-n_val:][:64], chunks[:-n_val] if len(chunks) > 1 else chunks
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)

    def held_out() -> float:
        model.eval()
        with torch.no_grad():
            out = float(model(input_ids=val, labels=val).loss)
        model.train()
        return out

    t0 = time.perf_counter()
    before = held_out()
    losses, done = [], 0
    for step, idx in enumerate(batch_indices(len(train), batch_size, steps, seed)):
        x = train[idx]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = step + 1
        if log and step % 50 == 0:
            log(f"pre-training: step {step}/{steps}, loss {losses[-1]:.3f}, {time.perf_counter() - t0:.0f}s")
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    after = held_out()
    model.eval()
    return {"losses": losses, "steps": done, "seconds": time.perf_counter() - t0,
            "held_out_loss_before": before, "held_out_loss_after": after}


def ensure_zoo_model(name: str, tokenizer_dir: str | Path, corpus: str | Path, cache: str | Path,
                     steps: int = 300, seq_len: int = 128, batch_size: int = 16, lr: float = 3e-3,
                     max_seconds: float | None = 240.0, seed: int = 0, config: dict | None = None,
                     log: Callable[[str], None] | None = print) -> Path:
    """Return the folder of zoo model ``name`` under ``cache``, building and pre-training it on first use.

    ``config`` overrides ``ZOO[name]`` (used by tests for tiny sizes). ``corpus`` is a text file
    (stories separated by blank lines). The folder also holds ``zoo.json`` with the config, the
    exact parameter count and the pre-training record."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if config is None:
        if name not in ZOO:
            raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
        config = ZOO[name]
    tag = f"{name}-{VERSION}-s{steps}-L{seq_len}-b{batch_size}-seed{seed}" + ("" if lr == 3e-3 else f"-lr{lr:g}")
    out = Path(cache) / tag
    if (out / "config.json").exists() and (out / "zoo.json").exists():
        return out
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = llama_config(vocab_size=len(tokenizer), **config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    text = Path(corpus).read_text(encoding="utf-8")
    chunks = text_chunks(text, tokenizer, seq_len, max_chunks=max(steps * batch_size, 64) + 64)
    if log:
        log(f"zoo model {name}: {n_params:,} parameters, {len(chunks)} chunks of {seq_len} tokens")
    rec = pretrain_lm(model, chunks, steps, batch_size, lr, seed, max_seconds, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).exists():
                shutil.copy2(tokenizer_dir / f, tmp / f)
        info = {"name": name, "version": VERSION, "config": config, "parameters": n_params,
                "pretrain": {"corpus": str(corpus), "steps_requested": steps, "steps_done": rec["steps"],
                             "seconds": rec["seconds"], "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
                             "held_out_loss_before": rec["held_out_loss_before"],
                             "held_out_loss_after": rec["held_out_loss_after"],
                             "first_loss": rec["losses"][0] if rec["losses"] else None,
                             "last_loss": rec["losses"][-1] if rec["losses"] else None,
                             "threads": torch.get_num_threads()}}
        (tmp / "zoo.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"zoo model {name}: pre-trained {rec['steps']} steps in {rec['seconds']:.0f}s, held-out loss "
            f"{rec['held_out_loss_before']:.3f} -> {rec['held_out_loss_after']:.3f}; saved {out}")
    return out
