import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from mira.errors import MiraError
from mira.models.adapters import AdapterSlot, default_target_modules, lora_settings_to_peft
from mira.models.loader import load_base


def _slot(path, seed=0, r=4):
    base, tok = load_base(str(path))
    return AdapterSlot.attach(base, lora_settings_to_peft(base, r, 8, 0.0, None), seed=seed), tok


def test_default_targets_per_architecture(tiny_model_dir):
    base, _ = load_base(str(tiny_model_dir))
    assert default_target_modules(base) == ["q_proj", "v_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert default_target_modules(gpt2) == ["c_attn"]
    with pytest.raises(MiraError, match="target modules"):
        lora_settings_to_peft(base, 4, 8, 0.0, ["nope_proj"])


def test_missing_model_folder():
    with pytest.raises(MiraError, match="model folder not found"):
        load_base("/no/such/model")


def test_base_frozen_and_held_once(tiny_model_dir):
    slot, _ = _slot(tiny_model_dir)
    base_params = {n: p.data_ptr() for n, p in slot.model.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for n, p in slot.model.named_parameters() if "lora_" not in n)
    states = []
    for k in range(5):  # five "clients" through the one model
        s = {key: torch.randn_like(v) for key, v in slot.initial_state.items()}
        slot.set(s)
        states.append(slot.get())
    assert {n: p.data_ptr() for n, p in slot.model.named_parameters() if "lora_" not in n} == base_params
    slot.set(states[2])
    assert all(torch.equal(slot.get()[k], states[2][k]) for k in states[2])


def test_same_seed_same_initialisation(tiny_model_dir):
    a, _ = _slot(tiny_model_dir, seed=3)
    b, _ = _slot(tiny_model_dir, seed=3)
    c, _ = _slot(tiny_model_dir, seed=4)
    assert all(torch.equal(a.initial_state[k], b.initial_state[k]) for k in a.keys())
    assert any(not torch.equal(a.initial_state[k], c.initial_state[k]) for k in a.keys() if "lora_A" in k)


def test_saved_adapter_loads_in_peft_with_same_logits(tiny_model_dir, tmp_path):
    slot, _ = _slot(tiny_model_dir)
    state = {k: torch.randn_like(v) * 0.1 for k, v in slot.initial_state.items()}
    slot.save(state, tmp_path / "client_0")
    ids = torch.tensor([[1, 5, 9, 14, 22, 7]])
    slot.set(state)
    with torch.no_grad():
        ours = slot.model(input_ids=ids).logits
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "client_0")
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-6)
    with torch.no_grad():  # and the adapter matters: the bare base gives other logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert not torch.allclose(ours, plain)
    assert (tmp_path / "client_0" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob(".client_0*")), "no temp folders left behind"
