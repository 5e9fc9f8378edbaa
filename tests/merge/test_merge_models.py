"""Merging full Hugging Face models: outputs load with ``from_pretrained`` and hold the expected weights."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mira.merge import merge
from mira.merge.checkpoint import Checkpoint


def weights_of(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) model folder."""
    checkpoint = Checkpoint.open(folder, where="test")
    return {name: checkpoint.read(name) for name in checkpoint.names}


def recipe(method: str, models, **extra) -> dict:
    return {"merge_method": method, "models": [str(m) for m in models], **extra}


@pytest.mark.parametrize("method, extra", [
    ("linear", {"parameters": {"weights": [0.3, 0.7]}}),
    ("slerp", {"parameters": {"t": 0.4}}),  # parallel tensors: the linear fallback
    ("ties", {"base": True}),
    ("dare", {"base": True, "parameters": {"drop_rate": 0.0, "normalize": True}}),
])
def test_merging_a_model_with_itself_gives_the_same_logits(zoo, tmp_path, logits_of, method, extra):
    extra = dict(extra)
    if extra.pop("base", False):
        extra["base_model"] = str(zoo["base"])
    out = tmp_path / "out"
    merge(recipe(method, [zoo["ft0"], zoo["ft0"]], **extra), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits_of(model), logits_of(zoo["ft0"]), rtol=1e-5, atol=1e-5)


def test_linear_merge_is_the_weighted_mean_and_loads(zoo, tmp_path, logits_of):
    out = tmp_path / "soup"
    result = merge({"merge_method": "linear", "models": [
        {"model": str(zoo["ft0"]), "parameters": {"weight": 1.0}},
        {"model": str(zoo["ft1"]), "parameters": {"weight": 3.0}}]}, out)
    assert result.kind == "model" and result.files == ["model.safetensors"]
    a, b, merged = weights_of(zoo["ft0"]), weights_of(zoo["ft1"]), weights_of(out)
    assert merged.keys() == a.keys()
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + 3 * b[name]) / 4)
    expected = AutoModelForCausalLM.from_pretrained(zoo["ft0"])
    expected.load_state_dict({k: (a[k] + 3 * b[k]) / 4 for k in a}, strict=False)
    torch.testing.assert_close(logits_of(out), logits_of(expected.eval()))
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    saved = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert saved["merge_method"] == "linear" and len(saved["models"]) == 2


def test_task_arithmetic_matches_the_formula(zoo, tmp_path):
    out = tmp_path / "ta"
    merge(recipe("task_arithmetic", [zoo["ft0"], zoo["ft1"]], base_model=str(zoo["base"]),
                 parameters={"lambda": 0.7, "weights": [1.0, 0.5]}), out)
    base, a, b = (weights_of(zoo[k]) for k in ("base", "ft0", "ft1"))
    merged = weights_of(out)
    for name in base:
        expected = base[name] + 0.7 * ((a[name] - base[name]) + 0.5 * (b[name] - base[name]))
        torch.testing.assert_close(merged[name], expected)


def test_sharded_output_loads_and_reads_back_as_input(zoo, tmp_path, logits_of):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    merge(recipe("ties", [zoo["ft0"], zoo["ft1"], zoo["ft2"]], base_model=str(zoo["base"]),
                 parameters={"density": 0.4}), whole)
    result = merge(recipe("ties", [zoo["ft0"], zoo["ft1"], zoo["ft2"]], base_model=str(zoo["base"]),
                          parameters={"density": 0.4}), sharded, max_shard_mb=0.02)
    assert len(result.files) > 2 and result.files[0] == f"model-00001-of-{len(result.files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.files)
    assert index["metadata"]["total_size"] == result.num_bytes
    torch.testing.assert_close(logits_of(sharded), logits_of(whole), rtol=0, atol=0)
    # a sharded folder is a valid input too: linear of it with itself is itself
    merge(recipe("linear", [sharded, sharded]), tmp_path / "again")
    torch.testing.assert_close(weights_of(tmp_path / "again"), weights_of(whole))


def test_output_dtype(zoo, tmp_path):
    out = tmp_path / "bf16"
    merge(recipe("linear", [zoo["ft0"], zoo["ft1"]], dtype="bfloat16"), out)
    assert {t.dtype for t in weights_of(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_dare_is_reproducible_and_seed_dependent(zoo, tmp_path):
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        merge(recipe("dare", [zoo["ft0"], zoo["ft1"]], base_model=str(zoo["base"]),
                     parameters={"drop_rate": 0.5, "seed": seed, "combine": "ties"}), tmp_path / name)
        return weights_of(tmp_path / name)

    first, again, other = run("a", 1), run("b", 1), run("c", 2)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])


def test_merging_streams_one_tensor_name_at_a_time(zoo, tmp_path, monkeypatch):
    """Whenever an input tensor is read, count the input tensors still alive.

    TIES reads every model twice (threshold and sign election, then the disjoint mean), but
    holds no more than two models' tensors (and the base's) of one name at a time.
    """
    live: list[tuple[str, str, weakref.ref]] = []
    most_model_tensors, most_names = 0, 0
    read = Checkpoint.read

    def counting_read(self, name):
        nonlocal most_model_tensors, most_names
        tensor = read(self, name)
        live.append((self.where, name, weakref.ref(tensor)))
        alive = [(where, n) for where, n, ref in live if ref() is not None]
        most_model_tensors = max(most_model_tensors, sum(where != "base_model" for where, _ in alive))
        most_names = max(most_names, len({n for _, n in alive}))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    result = merge(recipe("ties", [zoo["ft0"], zoo["ft1"], zoo["ft2"]], base_model=str(zoo["base"]),
                          parameters={"density": 0.5}), tmp_path / "out", max_shard_mb=0.05)
    assert len(live) == (2 * 3 + 1) * result.num_tensors
    assert most_names == 1
    assert most_model_tensors <= 2
