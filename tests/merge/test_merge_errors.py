"""Bad recipes and bad inputs give one-line ``MiraError``s naming the file or field."""
from __future__ import annotations

import json
import shutil

import pytest

from mira.errors import MiraError
from mira.merge import load_recipe, merge

from .conftest import build_model


def recipe(method: str, models, **extra) -> dict:
    return {"merge_method": method, "models": [str(m) for m in models], **extra}


@pytest.mark.parametrize("data, field, message", [
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"density": 1.5}}]},
     "models[0].parameters.density", "density must be in (0, 1], got 1.5"),
    ({"merge_method": "ties", "models": ["a"], "parameters": {"density": 0.0}},
     "parameters.density", "density must be in (0, 1]"),
    ({"merge_method": "linear", "models": ["a", "b"], "parameters": {"weights": [1.0]}},
     "", "parameters.weights has 1 values for 2 models"),
    ({"merge_method": "linear", "models": ["a", {"model": "b", "parameters": {"weigth": 2}}]},
     "models[1].parameters.weigth", "unknown field"),
    ({"merge_method": "dare", "models": ["a"], "parameters": {"p": 1.0}}, "parameters.p", "less than 1"),
    ({"merge_method": "slerp", "models": ["a", "b"], "parameters": {"t": -0.1}}, "parameters.t", "greater than"),
    ({"merge_method": "linear", "models": []}, "models", "at least 1"),
    ({"models": ["a"]}, "merge_method", "Field required"),
])
def test_recipe_validation_names_the_field(data, field, message):
    with pytest.raises(MiraError) as err:
        load_recipe(data)
    assert str(err.value).startswith(field)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: ties\nmodels:\n  - model: a\n    parameters: {density: 2}\n")
    with pytest.raises(MiraError, match=rf"^{path}: models\[0\].parameters.density: density must be"):
        load_recipe(path)
    with pytest.raises(MiraError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    path.write_text("merge_method: [unclosed\n")
    with pytest.raises(MiraError, match="malformed YAML"):
        load_recipe(path)


def test_missing_folder(zoo, tmp_path):
    with pytest.raises(MiraError, match=r"^models\[1\].model: folder not found: .*nowhere"):
        merge(recipe("linear", [zoo["ft0"], tmp_path / "nowhere"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_task_vector_methods_need_a_base(zoo, tmp_path, method):
    with pytest.raises(MiraError, match=rf"^base_model: {method} works on task vectors"):
        merge(recipe(method, [zoo["ft0"], zoo["ft1"]], parameters={"density": 0.5}), tmp_path / "out")


def test_slerp_needs_exactly_two_models(zoo, tmp_path):
    with pytest.raises(MiraError, match="^models: slerp merges exactly 2 models, got 3"):
        merge(recipe("slerp", [zoo["ft0"], zoo["ft1"], zoo["ft2"]]), tmp_path / "out")


def test_different_architectures_and_shapes_are_refused(zoo, tmp_path):
    other_arch = tmp_path / "other_arch"
    shutil.copytree(zoo["ft1"], other_arch)
    config = json.loads((other_arch / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other_arch / "config.json").write_text(json.dumps(config))
    with pytest.raises(MiraError, match=r"^models\[1\].model: .* has model_type 'mistral' but models\[0\].model"):
        merge(recipe("linear", [zoo["ft0"], other_arch]), tmp_path / "out")

    wider = tmp_path / "wider"
    build_model(wider, seed=1, hidden_size=64)
    with pytest.raises(MiraError, match=r"^models\[1\].model: tensor 'lm_head.weight' has shape \(64, 64\) in .* "
                                        r"but \(64, 32\) in models\[0\].model"):
        merge(recipe("linear", [zoo["ft0"], wider]), tmp_path / "out")

    deeper = tmp_path / "deeper"
    build_model(deeper, seed=1, num_hidden_layers=3)
    with pytest.raises(MiraError, match=r"^base_model: .* does not have the same tensors .* has 'model.layers.2"):
        merge(recipe("ties", [zoo["ft0"], zoo["ft1"]], base_model=str(deeper)), tmp_path / "out")


def test_adapters_and_models_cannot_be_mixed(zoo, tmp_path):
    with pytest.raises(MiraError, match=r"^models\[1\].model: .* is a LoRA adapter but models\[0\] is a full model"):
        merge(recipe("linear", [zoo["ft0"], zoo["ad0"]]), tmp_path / "out")


def test_a_folder_that_is_neither_model_nor_adapter(zoo, tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(MiraError, match="neither config.json .* nor adapter_config.json"):
        merge(recipe("linear", [zoo["ft0"], tmp_path / "junk"]), tmp_path / "out")


def test_dare_needs_a_drop_rate(zoo, tmp_path):
    with pytest.raises(MiraError, match="^parameters.drop_rate: dare needs a drop rate"):
        merge(recipe("dare", [zoo["ft0"], zoo["ft1"]], base_model=str(zoo["base"])), tmp_path / "out")


def test_a_non_empty_output_folder_is_kept_unless_overwrite(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MiraError, match="not empty"):
        merge(recipe("linear", [zoo["ft0"], zoo["ft1"]]), out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(recipe("linear", [zoo["ft0"], zoo["ft1"]]), out, overwrite=True)
    assert not (out / "keep.txt").exists()
    with pytest.raises(MiraError, match="one of the inputs"):
        merge(recipe("linear", [zoo["ft0"], zoo["ft1"]]), zoo["ft1"], overwrite=True)


def test_unused_settings_are_reported_not_fatal(zoo, tmp_path):
    result = merge(recipe("linear", [zoo["ft0"], zoo["ft1"]], base_model=str(zoo["base"]),
                          parameters={"t": 0.3, "rank": 4}), tmp_path / "out")
    assert any("base_model is not used by linear" in w for w in result.warnings)
    assert any("parameters.t is not used by linear" in w for w in result.warnings)
    assert any("parameters.rank only applies to LoRA" in w for w in result.warnings)
