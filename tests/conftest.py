"""Shared fixtures: a tiny Llama built from a config (no download), small configs, assets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("MIRA_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden 32) with a BPE tokenizer trained on the synthetic suite."""
    from mira.data.prompts import MARKER, format_prompt
    from mira.data.synthetic import generate_suite
    from mira.models.demo import build_model, build_tokenizer

    out = tmp_path_factory.mktemp("tiny_model")
    texts = [format_prompt(r) + MARKER + r.output for r in generate_suite(20, seed=3)]
    tok = build_tokenizer(texts, vocab_size=200)
    model = build_model(len(tok), hidden=32, layers=2, seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_cfg(tiny_model_dir):
    """A raw config dict for a fast federated run on the synthetic suite (4 tasks)."""
    return {
        "seed": 0,
        "model": {"path": str(tiny_model_dir)},
        "lora": {"r": 4, "alpha": 8},
        "data": {"source": "synthetic", "tasks": ["add", "sub", "upper", "lower"], "max_per_task": 24,
                 "max_length": 80},
        "partition": {"name": "by_task", "test_size": 6},
        "federation": {"rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 0.01},
        "algorithm": {"name": "mira"},
        "eval": {"every": 1, "batch_size": 16},
        "plots": False,
    }


@pytest.fixture(scope="session")
def assets() -> Path:
    root = os.environ.get("MIRA_ASSETS")
    if not root or not Path(root, "ASSETS.md").exists():
        pytest.skip("MIRA_ASSETS not set (real data and stories260K)")
    return Path(root)


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def crash_then_resume(ws, cfg, out: Path, crash_at: int, monkeypatch):
    """Run ``cfg`` into ``out``, interrupted (KeyboardInterrupt) when round ``crash_at`` starts, then
    resume it in a fresh engine; returns ``(resumed engine, its summary)``."""
    from mira.federated.engine import Engine

    real = Engine.run_round

    def crashing(self, rnd, progress):
        if rnd == crash_at:
            raise KeyboardInterrupt
        return real(self, rnd, progress)

    monkeypatch.setattr(Engine, "run_round", crashing)
    with pytest.raises(KeyboardInterrupt):
        Engine(ws, cfg, out).run()
    monkeypatch.setattr(Engine, "run_round", real)
    resumed = Engine(ws, cfg, out)
    return resumed, resumed.run(resume=True)
