"""mira.models.zoo: a Llama built from a config with a given tokenizer, briefly pre-trained, saved, cached."""
import json
import random

import torch

from mira.models.zoo import ZOO, count_params, ensure_zoo_model, llama_config

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def _tokenizer_dir(tmp_path):
    """A tiny word-level fast tokenizer with <unk>/<s>/</s> at ids 0/1/2 (as stories260K's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "log", "and", "saw", "big", "small", "red"]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    d = tmp_path / "tok"
    fast.save_pretrained(d)
    return d, words


def _corpus(tmp_path, words):
    rng = random.Random(0)
    # a very regular corpus (fixed templates), so a few steps visibly lower the loss
    stories = [" ".join(["the", rng.choice(["cat", "dog"]), "sat", "on", "the", "mat"] * 3) for _ in range(300)]
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(stories))
    return p


def test_zoo_builds_pretrains_saves_and_caches(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir, words = _tokenizer_dir(tmp_path)
    corpus = _corpus(tmp_path, words)
    cache = tmp_path / "cache"
    logs = []
    out = ensure_zoo_model("tiny", tok_dir, corpus, cache, steps=30, seq_len=32, batch_size=8, lr=1e-2,
                           max_seconds=None, config=TINY, log=logs.append)
    assert out.parent == cache and (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    info = json.loads((out / "zoo.json").read_text())
    pre = info["pretrain"]
    assert pre["steps_done"] == 30
    assert pre["held_out_loss_after"] < pre["held_out_loss_before"] - 0.5
    assert pre["last_loss"] < pre["first_loss"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok) == len(words) + 3
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    with torch.no_grad():
        assert torch.isfinite(model(**tok("the cat sat", return_tensors="pt")).logits).all()
    # second call: reused, nothing rebuilt
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    logs.clear()
    again = ensure_zoo_model("tiny", tok_dir, corpus, cache, steps=30, seq_len=32, batch_size=8, lr=1e-2,
                             max_seconds=None, config=TINY, log=logs.append)
    assert again == out and (out / "model.safetensors").stat().st_mtime_ns == mtime and not logs


def test_zoo_sizes_are_about_4x_and_16x_stories260k():
    base = count_params(llama_config())
    assert base == 260_032  # stories260K's exact count
    assert 3.8 < count_params(llama_config(**ZOO["x4"])) / base < 4.2
    assert 15.5 < count_params(llama_config(**ZOO["x16"])) / base < 16.5
    assert 55 < count_params(llama_config(**ZOO["x64"])) / base < 58
