"""LoRA on a model from private records, through the core trainer (``mira proxy train``).

The device trains its proxy here; the experiment trains the target's upper bound with the
same function. The steps are mira's own: ``load_base`` (frozen), ``tokenize_records``
(loss on the response only), ``AdapterSlot.attach`` and ``LocalTrainer.train``; the result
is saved in PEFT format with ``AdapterSlot.save`` plus a ``mira_training.json`` summary.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mira.data.prompts import tokenize_records
from mira.data.records import Record
from mira.errors import MiraError
from mira.io import atomic_write_json
from mira.models.adapters import AdapterSlot, lora_settings_to_peft
from mira.train.trainer import LocalTrainer, TrainResult, TrainSettings


@dataclass
class AdapterTraining:
    """LoRA shape and the optimiser settings handed to ``LocalTrainer``."""

    rank: int = 8
    lora_alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    max_length: int = 384
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise MiraError(f"{name} must be at least 1, got {getattr(self, name)}",
                                where=f"--{name.replace('_', '-')}")
        if self.lr <= 0:
            raise MiraError(f"learning rate must be positive, got {self.lr}", where="--lr")


@dataclass
class TrainedAdapter:
    slot: AdapterSlot  # the PEFT model, holding the trained adapter
    tokenizer: object
    result: TrainResult
    path: Path | None
    summary: dict = field(default_factory=dict)


def train_adapter(base_path: str, records: list[Record], settings: AdapterTraining, out_dir: str | Path | None = None,
                  base=None, tokenizer=None, log=None) -> TrainedAdapter:
    """Train a LoRA adapter on ``records``; save it to ``out_dir`` (PEFT format) when given.

    ``base``/``tokenizer``: an already loaded frozen model (the experiment reuses it);
    otherwise ``base_path`` is loaded with ``load_base``.
    """
    from mira.models.loader import load_base

    if not records:
        raise MiraError("no training records", where="data")
    if base is None:
        base, tokenizer = load_base(base_path, where="--proxy")
    ds = tokenize_records(records, tokenizer, settings.max_length)
    lora = lora_settings_to_peft(base, settings.rank, settings.lora_alpha, settings.dropout, settings.target_modules)
    slot = AdapterSlot.attach(base, lora, seed=settings.seed)
    trainer = LocalTrainer(slot, tokenizer.pad_token_id, TrainSettings(
        lr=settings.lr, batch_size=settings.batch_size, weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip, steps=settings.steps))
    t0 = time.perf_counter()
    result = trainer.train(ds, seed=settings.seed, steps=settings.steps)
    seconds = time.perf_counter() - t0
    summary = {"base": str(base_path), "records": len(records), "response_tokens": ds.num_target_tokens(),
               "settings": asdict(settings), "steps": result.steps, "mean_train_loss": result.loss,
               "tokens": result.tokens, "seconds": round(seconds, 2),
               "trainable_parameters": sum(p.numel() for p in slot.params.values())}
    if log:
        log(f"trained LoRA r={settings.rank} on {len(records)} records: {result.steps} steps in {seconds:.1f}s, "
            f"mean loss {result.loss:.4f}")
    path = None
    if out_dir is not None:
        path = slot.save(slot.get(), out_dir)
        atomic_write_json(path / "mira_training.json", summary)
    return TrainedAdapter(slot=slot, tokenizer=tokenizer, result=result, path=path, summary=summary)
