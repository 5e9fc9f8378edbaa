"""mira's demo base model: a tiny Llama that mira builds and pre-trains itself.

``builtin:demo`` resolves to a cached folder (``$MIRA_CACHE``, default
``~/.cache/mira``). On first use mira trains a BPE tokenizer (digits split one by one)
on the synthetic suite's text, builds a 3-layer Llama (hidden 64, about 0.1M
parameters) from a config, pre-trains it for a minute on the *pre-training* tasks of
``mira.data.synthetic`` (copy, first letter, word count, repeat a number) so it knows
the prompt format but none of the eight federated tasks, and saves it in Hugging Face
format. The folder is written atomically, so an interrupted build is simply redone.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

VERSION = "v2"  # v2: prompts tokenised as one text (the boundary-checked split of mira.data.prompts)


def cache_dir() -> Path:
    return Path(os.environ.get("MIRA_CACHE", Path.home() / ".cache" / "mira"))


def build_tokenizer(texts: list[str], vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-#:.,'"))
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build_model(vocab_size: int, hidden: int = 64, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlamaForCausalLM(cfg)


def pretrain(model, tokenizer, steps: int = 600, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
             log=None) -> list[float]:
    """Full-parameter pre-training on the synthetic pre-training tasks (plain causal LM loss on the response)."""
    from mira.data.prompts import tokenize_records
    from mira.data.synthetic import PRETRAIN_TASKS, generate_suite
    from mira.train.trainer import batch_indices
    from mira.data.prompts import collate

    records = generate_suite(n_per_task=1000, seed=seed + 1000, registry=PRETRAIN_TASKS)
    ds = tokenize_records(records, tokenizer, max_length=128)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step, idx in enumerate(batch_indices(len(ds), batch_size, steps, seed)):
        loss = model(**collate(ds, idx, tokenizer.pad_token_id)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if log and step % 100 == 0:
            log(f"pre-training the demo model: step {step}/{steps}, loss {loss:.3f}")
    model.eval()
    return losses


def ensure_demo_model(name: str = "demo", log=print) -> Path:
    """Return the cached demo model folder, building it on first use."""
    if name != "demo":
        from mira.errors import MiraError

        raise MiraError(f"unknown built-in model 'builtin:{name}'; the only one is 'builtin:demo'", where="model.path")
    out = cache_dir() / f"demo-model-{VERSION}"
    if (out / "config.json").exists():
        return out
    from mira.data.prompts import format_prompt, MARKER
    from mira.data.synthetic import PRETRAIN_TASKS, generate_suite

    t0 = time.time()
    texts = [format_prompt(r) + MARKER + r.output
             for r in generate_suite(60, seed=7) + generate_suite(60, seed=7, registry=PRETRAIN_TASKS)]
    tokenizer = build_tokenizer(texts)
    model = build_model(len(tokenizer))
    pretrain(model, tokenizer, log=log)
    from mira.io import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if log:
        log(f"built the demo model in {time.time() - t0:.0f}s: {out}")
    return out
