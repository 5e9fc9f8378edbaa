"""Merging LoRA adapters: factors vs delta space, SVD re-factoring, PEFT and full-model outputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from mira.errors import MiraError
from mira.merge import merge
from mira.merge.checkpoint import Checkpoint
from mira.merge.lora import lora_modules, scaling

from .conftest import build_adapter


def deltas_of(folder) -> dict[str, torch.Tensor]:
    """``scaling * B @ A`` per module of an adapter folder."""
    adapter = Checkpoint.open(folder, where="test")
    out = {}
    for module in lora_modules(adapter.names, "test"):
        a, b = adapter.read(module.a_key), adapter.read(module.b_key)
        out[module.name] = scaling(adapter.config, module.name, a.shape[0]) * b @ a
    return out


def factors_of(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    adapter = Checkpoint.open(folder, where="test")
    return {m.name: (adapter.read(m.a_key), adapter.read(m.b_key)) for m in lora_modules(adapter.names, "test")}


def adapters(method: str, folders, **parameters) -> dict:
    return {"merge_method": method, "models": [str(f) for f in folders], "parameters": parameters}


def peft_logits(base_dir, adapter_dir, logits_of) -> torch.Tensor:
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    return logits_of(model)


def test_factor_averaging_is_not_delta_averaging_and_delta_space_is_exact(zoo, tmp_path):
    d0, d1 = deltas_of(zoo["ad0"]), deltas_of(zoo["ad1"])
    f0, f1 = factors_of(zoo["ad0"]), factors_of(zoo["ad1"])
    s = 8 / 4  # alpha / r of both inputs
    merge(adapters("linear", [zoo["ad0"], zoo["ad1"]], space="factors"), tmp_path / "factors")
    merge(adapters("linear", [zoo["ad0"], zoo["ad1"]], space="delta", rank=8), tmp_path / "delta")
    by_factors, by_delta = deltas_of(tmp_path / "factors"), deltas_of(tmp_path / "delta")
    for name in d0:
        mean_of_products = (d0[name] + d1[name]) / 2
        product_of_means = s * (f0[name][1] + f1[name][1]) / 2 @ ((f0[name][0] + f1[name][0]) / 2)
        # the cross terms B_0 A_1 + B_1 A_0 make the two differ by a lot here
        assert (product_of_means - mean_of_products).norm() > 0.3 * mean_of_products.norm()
        torch.testing.assert_close(by_factors[name], product_of_means, rtol=1e-5, atol=1e-5)
        # rank 8 = 4 + 4 holds the average of two rank-4 deltas exactly
        torch.testing.assert_close(by_delta[name], mean_of_products, rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "delta" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 8, False)


def test_delta_space_truncation_is_the_best_low_rank_approximation(zoo, tmp_path):
    merge(adapters("linear", [zoo["ad0"], zoo["ad1"]]), tmp_path / "r4")  # default rank: the largest input rank
    assert json.loads((tmp_path / "r4" / "adapter_config.json").read_text())["r"] == 4
    d0, d1, merged = deltas_of(zoo["ad0"]), deltas_of(zoo["ad1"]), deltas_of(tmp_path / "r4")
    for name in d0:
        exact = (d0[name] + d1[name]) / 2
        tail = torch.linalg.svdvals(exact)[4:]
        torch.testing.assert_close((merged[name] - exact).norm(), tail.norm(), rtol=1e-4, atol=1e-5)


def test_merged_adapter_loads_in_peft_and_matches_the_folded_model(zoo, tmp_path, logits_of):
    recipe = adapters("linear", [zoo["ad0"], zoo["ad1"]], rank=8)
    merge(recipe, tmp_path / "adapter")
    recipe_model = {**recipe, "base_model": str(zoo["base"]), "parameters": {**recipe["parameters"], "output": "model"}}
    result = merge(recipe_model, tmp_path / "model")
    assert result.kind == "model"

    expected = LlamaForCausalLM.from_pretrained(zoo["base"]).eval()
    d0, d1 = deltas_of(zoo["ad0"]), deltas_of(zoo["ad1"])
    with torch.no_grad():
        for name, module in expected.named_modules():
            if name in d0:
                module.weight += (d0[name] + d1[name]) / 2
    want = logits_of(expected)
    torch.testing.assert_close(peft_logits(zoo["base"], tmp_path / "adapter", logits_of), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "model")), want,
                               rtol=1e-4, atol=1e-4)


def test_factor_space_adapter_loads_in_peft_and_folds_the_same(zoo, tmp_path, logits_of):
    recipe = adapters("ties", [zoo["ad0"], zoo["ad1"]], space="factors", density=0.5)
    merge(recipe, tmp_path / "adapter")
    merge({**recipe, "base_model": str(zoo["base"]), "parameters": {**recipe["parameters"], "output": "model"}},
          tmp_path / "model")
    torch.testing.assert_close(peft_logits(zoo["base"], tmp_path / "adapter", logits_of),
                               logits_of(tmp_path / "model"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("space", ["factors", "delta"])
def test_an_adapter_merged_with_itself_is_itself(zoo, tmp_path, logits_of, space):
    merge(adapters("linear", [zoo["ad0"], zoo["ad0"]], space=space), tmp_path / "out")
    torch.testing.assert_close(peft_logits(zoo["base"], tmp_path / "out", logits_of),
                               peft_logits(zoo["base"], zoo["ad0"], logits_of), rtol=1e-4, atol=1e-4)


def test_factor_space_folds_different_scalings_into_b(zoo, tmp_path):
    other = build_adapter(tmp_path / "alpha4", zoo["base"], seed=5, r=4, alpha=4)  # scaling 1 instead of 2
    merge(adapters("linear", [zoo["ad0"], other], space="factors"), tmp_path / "out")
    f0, f1, merged = factors_of(zoo["ad0"]), factors_of(other), factors_of(tmp_path / "out")
    for name, (a, b) in merged.items():
        torch.testing.assert_close(a, (f0[name][0] + f1[name][0]) / 2)
        torch.testing.assert_close(b, (2 * f0[name][1] + 1 * f1[name][1]) / 2)


def test_ranks_may_differ_in_delta_space_but_not_in_factor_space(zoo, tmp_path):
    small = build_adapter(tmp_path / "r2", zoo["base"], seed=6, r=2, alpha=16)
    merge(adapters("linear", [zoo["ad0"], small], rank=6), tmp_path / "delta")
    d0, d1, merged = deltas_of(zoo["ad0"]), deltas_of(small), deltas_of(tmp_path / "delta")
    for name in d0:
        torch.testing.assert_close(merged[name], (d0[name] + d1[name]) / 2, rtol=1e-4, atol=1e-5)
    with pytest.raises(MiraError, match=r"^models\[1\].model: tensor '.*lora_A.weight' has shape \(2, 32\)"):
        merge(adapters("linear", [zoo["ad0"], small], space="factors"), tmp_path / "factors")


def test_rank_pattern_adapters_round_trip_in_factor_space(zoo, tmp_path, logits_of):
    model = LlamaForCausalLM.from_pretrained(zoo["base"])
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                        alpha_pattern={"v_proj": 6})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(tmp_path / "patterned")
    merge(adapters("linear", [tmp_path / "patterned"] * 2, space="factors"), tmp_path / "out")
    out_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert out_config["r"] == 4 and set(out_config["rank_pattern"].values()) == {2}
    torch.testing.assert_close(peft_logits(zoo["base"], tmp_path / "out", logits_of),
                               peft_logits(zoo["base"], tmp_path / "patterned", logits_of), rtol=1e-4, atol=1e-4)


def test_output_model_finds_the_base_in_the_adapter_config_or_asks_for_it(zoo, tmp_path):
    result = merge(adapters("linear", [zoo["ad0"], zoo["ad1"]], output="model"), tmp_path / "found")
    assert any("base_model not set; using" in w for w in result.warnings)
    assert (tmp_path / "found" / "config.json").is_file()

    orphan = tmp_path / "orphan"
    shutil.copytree(zoo["ad1"], orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/not-here"
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MiraError, match="^base_model: output: model folds the merged adapter into a base model"):
        merge(adapters("linear", [orphan, zoo["ad0"]], output="model"), tmp_path / "missing")


@pytest.mark.parametrize("method, parameters", [
    ("task_arithmetic", {"lambda": 0.5}),
    ("ties", {"density": 0.3}),
    ("dare", {"drop_rate": 0.3, "combine": "ties"}),
    ("slerp", {"t": 0.3}),
])
def test_every_method_merges_adapters_without_a_base(zoo, tmp_path, logits_of, method, parameters):
    merge(adapters(method, [zoo["ad0"], zoo["ad1"]], **parameters), tmp_path / "out")
    logits = peft_logits(zoo["base"], tmp_path / "out", logits_of)
    assert torch.isfinite(logits).all()
