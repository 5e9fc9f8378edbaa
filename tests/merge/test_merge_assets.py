"""Merges of the real stories260K Llama (``$MIRA_ASSETS/models/stories260K``); skipped without ``MIRA_ASSETS``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mira.merge import merge

from .conftest import build_adapter

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def stories() -> Path:
    root = os.environ.get("MIRA_ASSETS")
    if not root:
        pytest.skip("MIRA_ASSETS is not set")
    path = Path(root) / "models" / "stories260K"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


def test_real_model_merged_with_itself_keeps_its_logits_and_tokenizer(stories, tmp_path):
    out = tmp_path / "soup"
    merge({"merge_method": "slerp", "models": [str(stories), str(stories)], "parameters": {"t": 0.5}}, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Once upon a time there was a little cat", return_tensors="pt").input_ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(stories).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(got, want)


def test_real_model_adapters_fold_into_a_loadable_model(stories, tmp_path):
    for i in range(2):
        build_adapter(tmp_path / f"ad{i}", stories, seed=i, r=4, alpha=8)
    out = tmp_path / "folded"
    merge({"merge_method": "ties", "base_model": str(stories), "models": [str(tmp_path / "ad0"), str(tmp_path / "ad1")],
           "parameters": {"density": 0.5, "output": "model"}}, out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5
