"""Base models and LoRA adapters: one frozen base in memory, adapters swapped in and out."""
from mira.models.adapters import AdapterSlot, AdapterState, lora_settings_to_peft
from mira.models.loader import load_base, resolve_device

__all__ = ["AdapterSlot", "AdapterState", "load_base", "lora_settings_to_peft", "resolve_device"]
