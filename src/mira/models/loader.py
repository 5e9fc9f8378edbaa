"""Load any Hugging Face causal LM and its tokenizer, once, frozen.

``path`` is a local folder, a Hub id, or ``builtin:demo`` (mira's own tiny model,
built and pre-trained on first use; see ``mira.models.demo``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mira.errors import MiraError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MiraError(f"device {device!r} requested but CUDA is not available", where="model.device")
    return torch.device(device)


def quiet_transformers() -> None:
    """No weight-loading progress bars or deprecation chatter from transformers on our stderr."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")


def set_threads(model) -> None:
    """``MIRA_THREADS`` if set; else one thread for tiny models (<10M parameters), which on a
    shared CPU run several times faster than with several spin-waiting OpenMP threads."""
    env = os.environ.get("MIRA_THREADS")
    if env:
        torch.set_num_threads(int(env))
    elif sum(p.numel() for p in model.parameters()) < 10_000_000:
        torch.set_num_threads(1)


def _looks_like_hub_id(path: str) -> bool:
    return "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1 and not Path(path).exists()


def load_base(path: str, dtype: str = "float32", device: str = "auto", where: str = "model.path"):
    """Return ``(model, tokenizer)`` with every base parameter frozen and the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    if path.startswith("builtin:"):
        from mira.models.demo import ensure_demo_model

        path = str(ensure_demo_model(path.split(":", 1)[1]))
    local = Path(os.path.expanduser(path))
    if not local.exists() and not _looks_like_hub_id(path):
        raise MiraError(f"model folder not found: {path}", where=where)
    if local.exists() and not (local / "config.json").exists():
        raise MiraError(f"{path} is not a Hugging Face model folder (no config.json)", where=where)
    if dtype not in DTYPES:
        raise MiraError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}", where="model.dtype")
    src = str(local) if local.exists() else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype])
    except OSError as e:
        raise MiraError(f"cannot load model {path!r}: {str(e).splitlines()[0]}", where=where) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    set_threads(model)
    model.to(resolve_device(device))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
