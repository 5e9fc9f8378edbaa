"""Load any Hugging Face causal LM and its tokenizer, once, frozen.

``path`` is a local folder, a Hub id, a model alias from ``mira.models.registry`` (e.g.
``smollm2-135m-instruct``, fetched and converted into ``$MIRA_CACHE`` on first use),
``builtin:demo`` (mira's own tiny model, built and pre-trained on first use; see
``mira.models.demo``), or a ``.gguf`` file (converted once into ``$MIRA_CACHE``).

``quantization`` (``4bit`` or ``8bit``) loads the base through bitsandbytes for QLoRA;
it needs a CUDA GPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mira.errors import MiraError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto", where: str = "model.device") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MiraError(f"device {device!r} requested but CUDA is not available", where=where)
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise MiraError(f"unknown device {device!r} ({e}); use auto, cpu, cuda, cuda:N or mps", where=where) from None


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


# what ``from_pretrained`` raises for a folder whose files are broken (truncated or empty weights, a
# config that is not JSON, a tokenizer that cannot be built): the user's files, so a one-line MiraError
_BROKEN_FILES = (OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError, EOFError, AttributeError)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


def _broken(e: BaseException) -> bool:
    return isinstance(e, _BROKEN_FILES) or type(e).__name__ == "SafetensorError"


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 200 else text[:200] + "..."


def _tokenizer(src: str, path: str, where: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        if not _broken(e):
            raise
        local = Path(src)
        if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
            raise MiraError(f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:3])}); copy the base "
                            "model's tokenizer files into it", where=where) from None
        raise MiraError(f"cannot load the tokenizer of {path!r}: {_first_line(e)}", where=where) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_tokenizer(path: str, where: str = "model.path"):
    """Only the tokenizer of ``path`` (resolved as ``load_base`` does), e.g. for ``mira data inspect``."""
    quiet_transformers()
    return _tokenizer(resolve_model_path(path, where), path, where)


QUANTIZATIONS = ("4bit", "8bit")
NO_CUDA = "model.quantization needs a CUDA GPU (bitsandbytes); this machine has none"


def check_quantization(quantization: str | None, device: str = "auto") -> None:
    """Fail fast, before anything is fetched, when ``quantization`` cannot work here."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise MiraError(f"unknown quantization {quantization!r}; choose one of {list(QUANTIZATIONS)}",
                        where="model.quantization")
    if not torch.cuda.is_available():
        raise MiraError(NO_CUDA, where="model.quantization")
    if resolve_device(device).type != "cuda":
        raise MiraError(f"model.quantization needs model.device to be a CUDA device, got {device!r}",
                        where="model.quantization")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise MiraError("model.quantization needs the bitsandbytes package: pip install bitsandbytes",
                        where="model.quantization")


def bnb_config(quantization: str):
    """QLoRA's settings: 4-bit NF4 (double quantization, bf16 compute) or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def resolve_model_path(path: str, where: str = "model.path") -> str:
    """An alias, ``builtin:NAME``, a ``.gguf`` file, a folder or a Hub id -> what ``from_pretrained`` loads
    (aliases and GGUF files are fetched/converted once into ``$MIRA_CACHE``)."""
    from mira.models import registry

    entry = registry.lookup(path)
    if entry is not None:
        return entry.ensure(registry.stderr_log)
    if path.startswith("builtin:"):
        from mira.models.demo import ensure_demo_model

        return str(ensure_demo_model(path.split(":", 1)[1]))
    if path.lower().endswith(".gguf"):
        local = Path(os.path.expanduser(path))
        if not local.is_file():
            raise MiraError(f"GGUF file not found: {path}", where=where)
        return str(registry.ensure_gguf(local, registry.stderr_log))
    local = Path(os.path.expanduser(path))
    if not local.exists() and not _looks_like_hub_id(path):
        hint = "" if "/" in path else f" (nor a model alias: {', '.join(sorted(registry.MODELS))})"
        raise MiraError(f"model folder not found: {path}{hint}", where=where)
    if local.is_file():
        raise MiraError(f"{path} is a file; expected a Hugging Face model folder (with config.json) or a .gguf file",
                        where=where)
    if local.exists() and not (local / "config.json").exists():
        raise MiraError(f"{path} is not a Hugging Face model folder (no config.json)", where=where)
    return str(local) if local.exists() else path


def load_base(path: str, dtype: str = "float32", device: str = "auto", where: str = "model.path",
              quantization: str | None = None):
    """Return ``(model, tokenizer)`` with every base parameter frozen and the model in eval mode.

    With ``quantization`` the linear layers are bitsandbytes 4/8-bit layers on the GPU and
    ``peft.prepare_model_for_kbit_training`` has cast the remaining (norm, embedding) weights to
    float32 for stable training, as QLoRA does; the weights stay frozen either way."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()

    if dtype not in DTYPES:
        raise MiraError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}", where="model.dtype")
    check_quantization(quantization, device)
    src = resolve_model_path(path, where)
    kwargs = {"dtype": DTYPES[dtype]}
    if quantization:
        dev = resolve_device(device)
        kwargs.update(quantization_config=bnb_config(quantization),
                      device_map={"": dev.index if dev.index is not None else torch.cuda.current_device()})
    tokenizer = _tokenizer(src, path, where)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except Exception as e:
        if not _broken(e):
            raise
        why = " (its weights are empty, truncated or corrupt)" if type(e).__name__ == "SafetensorError" else ""
        raise MiraError(f"cannot load model {path!r}{why}: {_first_line(e)}", where=where) from None
    set_threads(model)
    if quantization:
        from peft import prepare_model_for_kbit_training

        # freezes everything and upcasts the non-quantized weights; checkpointing is the trainer's switch
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(resolve_device(device))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
