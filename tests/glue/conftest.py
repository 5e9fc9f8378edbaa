"""Shared fixture: a tiny zoo of LoRA adapters trained in the test on two synthetic tasks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

TASKS = ("add", "upper")


@pytest.fixture(scope="module")
def tiny_zoo(tiny_model_dir, tmp_path_factory) -> Path:
    """Adapters trained a few steps on two synthetic tasks, one exact copy, and a validation JSONL."""
    from mira.data.prompts import tokenize_records
    from mira.data.synthetic import generate_suite
    from mira.models.adapters import AdapterSlot, lora_settings_to_peft
    from mira.models.loader import load_base
    from mira.train.trainer import LocalTrainer, TrainSettings

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("zoo")
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    slot = AdapterSlot.attach(model, lora_settings_to_peft(model, 4, 8, 0.0, None), seed=0)
    trainer = LocalTrainer(slot, tok.pad_token_id, TrainSettings(lr=0.02, batch_size=8, steps=12))
    records = generate_suite(n_per_task=40, seed=7, tasks=list(TASKS))
    for task in TASKS:
        train = [r for r in records if r.task == task][:28]
        slot.set(slot.initial_state)
        trainer.train(tokenize_records(train, tok, 80), seed=0)
        slot.save(slot.get(), root / f"ad_{task}")
    shutil.copytree(root / "ad_add", root / "ad_add_copy")
    seen = {r2 for t in TASKS for r2 in [x for x in records if x.task == t][:28]}
    val = [r for r in records if r not in seen]
    (root / "val.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in val))
    zoo = {"base_model": str(tiny_model_dir),
           "members": [{"path": "ad_add", "task": "add"}, {"path": "ad_upper", "task": "upper"},
                       {"path": "ad_add_copy", "name": "add_copy"}],
           "validation": {"path": "val.jsonl", "max_per_task": 8, "max_length": 80},
           "test": {"path": "val.jsonl", "max_per_task": 12, "max_length": 80},
           "strategy": {"name": "heuristic_average"}, "mixture": {"kind": "router"}}
    (root / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    return root
