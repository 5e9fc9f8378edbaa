"""mira against mergekit 0.1.5: exact-k magnitude trim, defaults, DARE rescaling, SLERP's base, method names.

The reference outputs were recorded from mergekit itself by ``make_reference.py`` (in its own
venv) into ``reference/``; these tests only read them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mira.errors import MiraError
from mira.merge import MergeParams, get_method, merge, method_names
from mira.merge.checkpoint import Checkpoint
from mira.merge.methods.slerp import slerp
from mira.merge.methods.ties import kept_count, magnitude_threshold, trim, trim_to_density

REFERENCE = Path(__file__).parent / "reference"
META = json.loads((REFERENCE / "mergekit-0.1.5.json").read_text())
TENSORS = load_file(REFERENCE / "mergekit-0.1.5.safetensors")
BASE = TENSORS["base"]
MODELS = [TENSORS[f"model{i}"] for i in range(3)]


def tied_bf16(numel: int, seed: int) -> torch.Tensor:
    """As ``make_reference.tied_bf16``: non-zero bf16 values from 16 magnitudes, so most entries tie."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.randint(1, 17, (numel,), generator=gen).float() / 64
    sign = torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    return (magnitude * sign).to(torch.bfloat16)


def weights_of(folder) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint.open(folder, where="test")
    return {name: checkpoint.read(name) for name in checkpoint.names}


def mira_params(case: dict, **extra) -> MergeParams:
    """The ``MergeParams`` a mergekit case's parameters translate to."""
    parameters = dict(case["parameters"])
    rescale = parameters.pop("rescale", None)
    densities = case["densities"]
    return MergeParams(name=META["dare_name"], seed=META["dare_seed"], lam=parameters.pop("lambda", 1.0),
                       normalize=parameters.pop("normalize", None),
                       rescale=None if rescale is None else ("l1" if rescale else "none"),
                       densities=None if densities is None else tuple(densities), **extra)


# -- 1. the magnitude trim keeps exactly k entries ------------------------------------------


@pytest.mark.parametrize("density", [0.2, 1 / 3, 0.29, 0.5, 0.9])
def test_ties_trim_keeps_exactly_k_entries_of_a_tied_bf16_tensor(density):
    tau = tied_bf16(3200, seed=1).float()  # as the engine hands it over: bf16 read as float32
    k = max(1, int(density * tau.numel()))
    trimmed = trim_to_density(tau, density)
    assert int((trimmed != 0).sum()) == k  # was 37.2% of the entries at density 0.2
    # ties at the cut are broken by index: the same set as a stable descending sort
    order = torch.sort(tau.abs(), descending=True, stable=True).indices[:k]
    expected = torch.zeros_like(tau)
    expected[order] = tau[order]
    assert torch.equal(trimmed, expected)


def test_kept_count_is_mergekits_for_several_densities_and_sizes():
    assert kept_count(1 / 3, 3200) == 1066  # mira rounded to 1067 before
    assert kept_count(0.29, 100) == 28  # int(28.999...) as in mergekit, not round()
    for record in META["magnitude_kept"]:
        numel, density = record["numel"], record["density"]
        assert kept_count(density, numel) == max(1, int(density * numel)) == record["kept"], record
        tau = tied_bf16(numel, seed=numel).float()
        assert int((trim_to_density(tau, density) != 0).sum()) == record["kept"], record


def test_the_trim_is_the_same_in_both_passes_and_in_place():
    tau = tied_bf16(5000, seed=3).float().reshape(50, 100)
    cut = magnitude_threshold(tau, 0.25)
    assert cut is not None and cut.last_tied is not None  # the cut falls inside a run of ties
    first = trim(tau, cut)
    second = trim(tau.clone(), cut, in_place=True)
    assert torch.equal(first, second) and int((first != 0).sum()) == 1250
    assert torch.equal(trim(tau.T, magnitude_threshold(tau.T, 0.25)) != 0,
                       trim_to_density(tau.T.contiguous(), 0.25) != 0)  # non-contiguous input


def test_ties_on_bf16_checkpoints_keeps_exactly_k_per_tensor(zoo, tmp_path):
    for name in ("base", "ft0"):
        merge({"merge_method": "linear", "models": [str(zoo[name])], "dtype": "bfloat16"}, tmp_path / name)
    merge({"merge_method": "ties", "base_model": str(tmp_path / "base"), "dtype": "float32",
           "models": [{"model": str(tmp_path / "ft0"), "parameters": {"density": 0.2}}]}, tmp_path / "ties")
    base, out = weights_of(tmp_path / "base"), weights_of(tmp_path / "ties")
    for name, tensor in out.items():
        changed = int((tensor != base[name].float()).sum())
        assert changed == max(1, int(0.2 * tensor.numel())), name


# -- reference merges ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ties", "ties_lambda_sum", "ties_rescale", "task_arithmetic",
                                 "task_arithmetic_normalize"])
def test_ties_and_task_arithmetic_match_mergekit(key):
    case = META["cases"][key]
    out = get_method(case["method"]).merge_tensor(MODELS, case["weights"], BASE, mira_params(case))
    torch.testing.assert_close(out, TENSORS[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["dare_ties", "dare_ties_no_rescale", "dare_ties_normalize",
                                 "dare_linear", "dare_linear_no_rescale", "dare_linear_normalize"])
def test_dare_matches_mergekit_with_the_same_drops(key):
    """mergekit's defaults (no normalize, L1 rescale) and options, given mira's seeded drops."""
    case = META["cases"][key]
    out = get_method(case["method"]).merge_tensor(MODELS, case["weights"], BASE, mira_params(case))
    torch.testing.assert_close(out, TENSORS[key], rtol=1e-5, atol=1e-6)
    combine = "ties" if case["method"] == "dare_ties" else "linear"
    same = get_method("dare").merge_tensor(MODELS, case["weights"], BASE, mira_params(case, combine=combine))
    assert torch.equal(same, out)  # dare_ties = dare + combine: ties, dare_linear = dare + combine: linear


def test_dare_rescale_options_and_log_line(caplog):
    tau = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    dare = get_method("dare")
    outs = {}
    for rescale in ("l1", "inverse_density", "none"):
        with caplog.at_level(logging.INFO, logger="mira.merge.methods.dare"):
            caplog.clear()
            params = MergeParams(name="w", densities=(0.3,), rescale=rescale)
            dare.validate([1.0], params)
            outs[rescale] = dare.merge_tensor([tau], [1.0], None, params)
        assert f"rescale {rescale}" in caplog.text
    kept = outs["none"] != 0
    torch.testing.assert_close(outs["l1"].abs().sum(), tau.abs().sum())  # keeps the L1 norm
    torch.testing.assert_close(outs["inverse_density"][kept], tau[kept] / 0.3)
    assert torch.equal(outs["none"][kept], tau[kept])
    with caplog.at_level(logging.INFO, logger="mira.merge.methods.dare"):
        caplog.clear()
        dare.validate([1.0], MergeParams(densities=(0.3,)))
    assert "rescale l1" in caplog.text  # the default, as mergekit's rescale: true


def test_slerp_t0_is_the_base_as_in_mergekit():
    for t in (0.0, 0.3, 1.0):
        # mergekit was given [model0, base] with base_index 1: t = 0 is still the base
        torch.testing.assert_close(slerp(t, BASE, MODELS[0]), TENSORS[f"slerp_t{t}"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slerp(0.3, BASE, MODELS[1]), TENSORS["slerp_direct"], rtol=1e-5, atol=1e-6)


# -- 3. recipes ------------------------------------------------------------------------------


def test_slerp_recipe_starts_from_base_model_wherever_it_is_listed(zoo, tmp_path):
    base, ft0 = weights_of(zoo["base"]), weights_of(zoo["ft0"])
    second = merge({"merge_method": "slerp", "base_model": str(zoo["base"]), "parameters": {"t": 0.0},
                    "models": [str(zoo["ft0"]), str(zoo["base"])]}, tmp_path / "second")
    assert second.warnings == []
    assert all(torch.equal(t, base[n]) for n, t in weights_of(tmp_path / "second").items())
    merge({"merge_method": "slerp", "base_model": str(zoo["base"]), "parameters": {"t": 0.3},
           "models": [str(zoo["ft0"]), str(zoo["base"])]}, tmp_path / "listed")
    merge({"merge_method": "slerp", "base_model": str(zoo["base"]), "parameters": {"t": 0.3},
           "models": [str(zoo["ft0"])]}, tmp_path / "added")
    listed, added = weights_of(tmp_path / "listed"), weights_of(tmp_path / "added")
    for name in base:
        torch.testing.assert_close(listed[name], slerp(0.3, base[name], ft0[name]))
        assert torch.equal(added[name], listed[name])
    with pytest.raises(MiraError, match="^base_model: slerp interpolates from base_model"):
        merge({"merge_method": "slerp", "base_model": str(zoo["base"]),
               "models": [str(zoo["ft0"]), str(zoo["ft1"])]}, tmp_path / "three")


def test_a_mergekit_dare_ties_recipe_loads_and_means_the_same(zoo, tmp_path):
    recipe = tmp_path / "mergekit.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": str(zoo["base"]), "dtype": "float32",
        "models": [{"model": str(zoo["base"])},  # mergekit's idiom: "no parameters necessary for base model"
                   {"model": str(zoo["ft0"]), "parameters": {"density": 0.5, "weight": 0.6}},
                   {"model": str(zoo["ft1"]), "parameters": {"density": 0.4, "weight": 0.4}}],
        "parameters": {"int8_mask": True, "rescale": True}}))
    result = merge(recipe, tmp_path / "mk")
    assert result.method == "dare_ties" and result.num_models == 2 and result.warnings == []
    merge({"merge_method": "dare", "base_model": str(zoo["base"]), "parameters": {"combine": "ties"},
           "models": [{"model": str(zoo["ft0"]), "parameters": {"density": 0.5, "weight": 0.6}},
                      {"model": str(zoo["ft1"]), "parameters": {"density": 0.4, "weight": 0.4}}]},
          tmp_path / "mira")
    mk, mira = weights_of(tmp_path / "mk"), weights_of(tmp_path / "mira")
    assert all(torch.equal(mk[n], mira[n]) for n in mira)
    assert {"dare_ties", "dare_linear"} <= set(method_names())


def test_a_listed_base_is_not_a_task_vector(zoo, tmp_path):
    """With normalize: true the base's weight would count in the divisor if it were merged as a model."""
    common = {"merge_method": "task_arithmetic", "base_model": str(zoo["base"]), "parameters": {"normalize": True}}
    merge({**common, "models": [str(zoo["ft0"]), str(zoo["ft1"])]}, tmp_path / "plain")
    result = merge({**common, "models": [str(zoo["ft0"]), str(zoo["base"]), str(zoo["ft1"])]}, tmp_path / "listed")
    assert result.num_models == 2
    plain, listed = weights_of(tmp_path / "plain"), weights_of(tmp_path / "listed")
    assert all(torch.equal(plain[n], listed[n]) for n in plain)


def test_defaults_are_mergekits():
    """normalize: linear and ties yes; task_arithmetic, dare_linear and dare_ties no. rescale: dare l1, ties none."""
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([3.0, -1.0, -1.0, 0.5])
    weights = [1.0, 3.0]
    assert torch.allclose(get_method("linear").merge_tensor([a, b], weights, None, MergeParams()), (a + 3 * b) / 4)
    assert torch.allclose(get_method("task_arithmetic").merge_tensor([a, b], weights, base, MergeParams()), a + 3 * b)
    ties = get_method("ties").merge_tensor([a, b], weights, base, MergeParams())
    assert torch.allclose(ties, torch.tensor([2.5, -1.25, 3.0, 0.5]))  # means over the agreeing models
    keep_all = MergeParams(densities=(1.0, 1.0))
    dare_ties = get_method("dare_ties").merge_tensor([a, b], weights, base, keep_all)
    assert torch.allclose(dare_ties, torch.tensor([10.0, -5.0, 3.0, 2.0]))  # sums over the agreeing models
    assert torch.allclose(get_method("dare_linear").merge_tensor([a, b], weights, base, keep_all), a + 3 * b)
