"""``grow_llama`` keeps the function; ``build_models`` writes a target and a smaller proxy with one tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from mira.errors import MiraError
from mira.prada.models import (
    BuildSettings,
    PretrainSettings,
    build_models,
    grow_llama,
    num_params,
)


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def test_growing_keeps_the_function_and_adds_parameters():
    src = small_llama()
    big = grow_llama(src, layers=5, intermediate_size=72, seed=1)
    x = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        assert torch.allclose(src(x).logits, big(x).logits, atol=1e-5)
    assert big.config.num_hidden_layers == 5 and num_params(big) > num_params(src)
    with pytest.raises(MiraError, match="at least as large"):
        grow_llama(src, layers=1, intermediate_size=72)


def test_growing_stories260k_keeps_its_function(assets):
    src = AutoModelForCausalLM.from_pretrained(assets / "models/stories260K").eval()
    big = grow_llama(src, layers=10, intermediate_size=344)
    x = torch.randint(0, 512, (1, 64))
    with torch.no_grad():
        assert torch.allclose(src(x).logits, big(x).logits, atol=1e-4)


def test_build_models_on_tiny_inputs(zoo, tmp_path):
    stories = tmp_path / "stories.txt"
    stories.write_text("\n\n".join(f"Once upon a time there was a cat number {i}. It sat in the sun." for i in range(20)))
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("".join(json.dumps({"instruction": f"Name a colour {i}.", "context": "", "response": "green",
                                         "category": "open_qa" if i % 2 else "brainstorming"}) + "\n" for i in range(20)))
    settings = BuildSettings(target_layers=2, target_intermediate=48, target=PretrainSettings(steps=3, lr=1e-3),
                             proxy=PretrainSettings(steps=2, lr=1e-3), max_length=80, heldout=4,
                             exclude_categories=("brainstorming",))
    report = build_models(str(zoo.proxy), str(stories), str(dolly), tmp_path / "out", settings, log=lambda m: None)
    assert report["proxy"]["parameters"] < report["target"]["parameters"]
    assert report["train_examples"] == 16 + 6  # 20 stories - 4 held out; 10 Dolly records kept - 4 held out
    assert json.loads((tmp_path / "out/build.json").read_text())["target"]["pretrain"]["steps"] == 3
    toks = [AutoTokenizer.from_pretrained(tmp_path / "out" / name) for name in ("target", "proxy")]
    assert toks[0].get_vocab() == toks[1].get_vocab()
    for name in ("target", "proxy"):
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / name).config.vocab_size == 200


def test_shrink_llama_keeps_the_chosen_layers_and_the_vocabulary():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mira.errors import MiraError
    from mira.prada.models import shrink_llama

    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                       num_attention_heads=2, num_key_value_heads=1,
                                       max_position_embeddings=32)).eval()
    small = shrink_llama(src, keep_first=2, keep_last=1)
    assert small.config.num_hidden_layers == 3 and small.config.vocab_size == 64
    assert src.config.num_hidden_layers == 5  # the source is untouched
    for slot, layer in zip((0, 1, 4), small.model.layers):
        assert torch.equal(layer.mlp.down_proj.weight, src.model.layers[slot].mlp.down_proj.weight)
    assert torch.equal(small.model.embed_tokens.weight, src.model.embed_tokens.weight)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        full = small(ids).logits[0, -1]
        out = small(ids[:, :3], use_cache=True)
        out = small(ids[:, 3:4], past_key_values=out.past_key_values, use_cache=True)
        out = small(ids[:, 4:], past_key_values=out.past_key_values, use_cache=True)
    assert float((out.logits[0, -1] - full).abs().max()) < 1e-5  # the KV cache works on the kept layers
    with pytest.raises(MiraError):
        shrink_llama(src, keep_first=4, keep_last=1)


def _five_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=32)).eval()


def test_select_layers_keeps_any_increasing_subset_and_refuses_the_rest():
    from mira.prada.models import select_layers

    src = _five_layer_llama()
    small = select_layers(src, [0, 2, 3])
    assert small.config.num_hidden_layers == 3
    for layer, kept in zip(small.model.layers, (0, 2, 3)):
        assert torch.equal(layer.self_attn.q_proj.weight, src.model.layers[kept].self_attn.q_proj.weight)
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2]
    for bad in ([], [0, 1, 2, 3, 4], [2, 1], [0, 0, 1], [0, 5], [-1, 2]):
        with pytest.raises(MiraError):
            select_layers(src, bad)


def test_pack_joins_examples_into_full_blocks_with_every_token_in_the_loss():
    from mira.data.prompts import IGNORE, TokenizedDataset
    from mira.prada.models import pack

    ds = TokenizedDataset([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[IGNORE, 2, 3], [IGNORE, 5], [IGNORE, 7, 8, 9]], [], [0, 0, 0])
    packed = pack(ds, 4)
    assert packed.input_ids == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the lone last token is no example
    assert packed.labels == packed.input_ids


def test_distillation_loss_is_zero_for_the_teacher_and_ignores_padding():
    from mira.prada.models import distillation_loss

    torch.manual_seed(0)
    t = torch.randn(2, 3, 7)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert float(distillation_loss(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 3, 7)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s[mask.bool()], -1), torch.log_softmax(t[mask.bool()], -1),
                                     log_target=True, reduction="batchmean")
    garbage = s.clone()
    garbage[1, 2] = 1e4  # a padded position: must not count
    assert float(distillation_loss(garbage, t, mask)) == pytest.approx(float(ref), rel=1e-5)
    assert float(ref) > 0


def test_distilling_a_shrunk_model_moves_it_towards_its_source():
    """``pretrain(..., teacher=src)`` lowers KL(source || proxy) on the data it trains on."""
    from mira.data.prompts import TokenizedDataset, collate
    from mira.prada.models import distillation_loss, pretrain, select_layers

    src = _five_layer_llama()
    small = select_layers(src, [0, 4])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 64, (16, 12), generator=g).tolist()
    ds = TokenizedDataset(ids, [list(x) for x in ids], [], [0] * 16)
    batch = collate(ds, list(range(16)), 0)

    def kl():
        with torch.no_grad():
            return float(distillation_loss(small(input_ids=batch["input_ids"]).logits,
                                           src(input_ids=batch["input_ids"]).logits, batch["attention_mask"]))

    before = kl()
    teacher_weights = {k: v.clone() for k, v in src.state_dict().items()}
    losses = pretrain(small, ds, 0, PretrainSettings(steps=30, lr=3e-3, batch_size=8), teacher=src)
    assert kl() < 0.5 * before and losses[-1] < losses[0]
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in teacher_weights.items())  # the teacher is only read


def test_parse_layers_reads_ranges_and_refuses_junk():
    from mira.prada.cli import parse_layers

    assert parse_layers("0-3,7,26-29") == [0, 1, 2, 3, 7, 26, 27, 28, 29]
    assert parse_layers(None) is None
    with pytest.raises(MiraError, match="--keep-layers|layer"):
        parse_layers("0-a")
