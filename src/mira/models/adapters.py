"""LoRA adapters on one shared base model.

A client's whole state is an ``AdapterState``: a dict from PEFT's saved key names
(``base_model.model.<module>.lora_A.weight``, as in ``adapter_model.safetensors``)
to tensors. ``AdapterSlot`` wraps the single PEFT model and copies states in and
out of its LoRA parameters, so any number of clients share one base in memory.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from mira.errors import MiraError

AdapterState = Dict[str, torch.Tensor]


def default_target_modules(model) -> list[str]:
    """PEFT's per-architecture defaults: ``q_proj,v_proj`` for Llama, ``c_attn`` for GPT-2, ..."""
    model_type = getattr(model.config, "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise MiraError(f"no default LoRA target modules for model type {model_type!r}; set lora.target_modules",
                        where="lora.target_modules")
    return list(targets)


def lora_settings_to_peft(model, r: int, alpha: float, dropout: float, target_modules: list[str] | None) -> LoraConfig:
    targets = target_modules or default_target_modules(model)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise MiraError(f"target modules {missing} not found in the model (it has e.g. {sorted(names)[:8]})",
                        where="lora.target_modules")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def _saved_key(param_name: str, adapter_name: str) -> str:
    return param_name.replace(f".{adapter_name}.", ".")


class AdapterSlot:
    """The one PEFT model; client adapters are swapped in by copying tensors.

    ``attach`` wraps the frozen base with a LoRA adapter initialised from ``seed``;
    that initialisation is the same for every client (``initial_state``).

    **Other ranks** (``lora.ranks``): ``for_rank(r)`` adds to the same PEFT model a second named
    adapter of rank ``r`` (same config otherwise, so PEFT's scale is ``alpha / r``), initialised
    from the same seed (so its ``initial_state`` is that of a slot attached with rank ``r``), and
    returns its slot; ``activate()`` makes a slot's adapter the one PEFT's forward uses. Only
    the active adapter runs, so a rank-``r`` client trains and evaluates exactly as in a model
    that has only a rank-``r`` adapter.
    """

    def __init__(self, peft_model: PeftModel, adapter_name: str = "default"):
        self.model = peft_model
        self.adapter_name = adapter_name
        self.params: dict[str, torch.nn.Parameter] = {
            _saved_key(n, adapter_name): p
            for n, p in peft_model.named_parameters()
            if "lora_" in n and f".{adapter_name}." in n
        }
        if not self.params:
            raise MiraError("the LoRA config produced no trainable parameters", where="lora")
        self.initial_state = self.get()
        self.seed = 0
        self._ranks: dict[int, "AdapterSlot"] = {self.rank: self}  # shared by the slots of one model

    @classmethod
    def attach(cls, base, lora: LoraConfig, seed: int) -> "AdapterSlot":
        torch.manual_seed(seed)
        peft_model = get_peft_model(base, lora)
        for n, p in peft_model.named_parameters():
            p.requires_grad_("lora_" in n)
        slot = cls(peft_model)
        slot.seed = seed
        return slot

    # -- several ranks on one model -----------------------------------------------------
    @property
    def rank(self) -> int | None:
        """The LoRA rank of this slot's adapter (None for an adapter type without one)."""
        r = getattr(self.model.peft_config.get(self.adapter_name), "r", None)
        return int(r) if r is not None else None

    def for_rank(self, rank: int) -> "AdapterSlot":
        """The slot of a rank-``rank`` adapter on this model (this slot for its own rank), added on
        first use, initialised from this slot's seed without touching the global random state."""
        if rank not in self._ranks:
            name = f"rank{rank}"
            config = dataclasses.replace(self.model.peft_config[self.adapter_name], r=rank)
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                self.model.add_adapter(name, config)
            sub = AdapterSlot(self.model, name)
            sub.seed, sub._ranks = self.seed, self._ranks
            self._ranks[rank] = sub
        return self._ranks[rank]

    def activate(self) -> "AdapterSlot":
        """Make this slot's adapter the one the model runs (nothing to do if it already is)."""
        if self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)
        return self

    # -- state in and out -------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.params)

    def get(self) -> AdapterState:
        return {k: p.detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def set(self, state: AdapterState) -> None:
        if state.keys() != self.params.keys():
            extra, missing = set(state) - set(self.params), set(self.params) - set(state)
            raise MiraError(f"adapter keys do not match the model (extra {sorted(extra)[:3]}, missing {sorted(missing)[:3]})")
        for k, p in self.params.items():
            p.copy_(state[k])

    def trainable(self, keys: Iterable[str]) -> list[torch.nn.Parameter]:
        return [self.params[k] for k in keys]

    def num_bytes(self, state: AdapterState | None = None) -> int:
        state = state if state is not None else self.params
        return sum(t.numel() * t.element_size() for t in state.values())

    # -- PEFT format -------------------------------------------------------------------
    def save(self, state: AdapterState, out_dir: str | os.PathLike) -> Path:
        """Write ``state`` as a PEFT adapter folder (atomically: temp folder + rename)."""
        from mira.io import atomic_dir

        out = Path(out_dir)
        current = self.get()
        self.set(state)
        try:
            with atomic_dir(out) as tmp:
                self.model.save_pretrained(str(tmp), selected_adapters=[self.adapter_name])
                if self.adapter_name != "default":  # PEFT writes a named adapter into a subfolder
                    for f in (Path(tmp) / self.adapter_name).iterdir():
                        f.rename(Path(tmp) / f.name)
                    (Path(tmp) / self.adapter_name).rmdir()
        finally:
            self.set(current)
        return out


def is_lora_A(key: str) -> bool:
    return ".lora_A." in key


def flatten(state: AdapterState) -> torch.Tensor:
    return torch.cat([t.reshape(-1).float() for t in state.values()])


def all_finite(state: AdapterState) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def read_adapter_config(path: str | os.PathLike) -> dict:
    cfg = Path(path) / "adapter_config.json"
    if not cfg.exists():
        raise MiraError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    return json.loads(cfg.read_text())
