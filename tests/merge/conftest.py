"""Tiny Llama models and LoRA adapters, built in a temp dir once per test session."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)

TARGETS = ["q_proj", "v_proj"]


def tiny_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama with hidden size 32 (about 20k parameters)."""
    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_model(path: Path, seed: int, base: LlamaForCausalLM | None = None, noise: float = 0.02,
                **config) -> LlamaForCausalLM:
    """Save a tiny Llama to ``path``: random, or ``base`` plus Gaussian noise (a "fine-tune")."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config)).eval()
    if base is not None:
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(path)
    return model


def build_adapter(path: Path, base_dir: Path, seed: int, r: int = 4, alpha: int = 8) -> Path:
    """Save a LoRA adapter on ``q_proj``/``v_proj`` with random (non-zero) A and B."""
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Folders: ``base``, two fine-tunes ``ft0``/``ft1``, two adapters ``ad0``/``ad1`` (r=4, alpha 8)."""
    root = tmp_path_factory.mktemp("zoo")
    base = build_model(root / "base", seed=0)
    for i in range(3):
        build_model(root / f"ft{i}", seed=10 + i, base=base)
    for i in range(2):
        build_adapter(root / f"ad{i}", root / "base", seed=20 + i)
    return {p.name: p for p in root.iterdir()}


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.arange(1, 17).reshape(2, 8) % 64


@pytest.fixture
def logits_of(tokens) -> Callable[[object], torch.Tensor]:
    """Logits of a model (object or folder) on a fixed batch."""

    def run(model) -> torch.Tensor:
        if not isinstance(model, torch.nn.Module):
            model = LlamaForCausalLM.from_pretrained(model).eval()
        with torch.no_grad():
            return model(tokens).logits

    return run
