"""Record mergekit's outputs on small tensors, for ``tests/merge/test_merge_mergekit.py``.

Run it with a Python that has mergekit (not mira's venv; mergekit pins its own dependencies)::

    python3 -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit==0.1.5
    /tmp/mk/bin/python tests/merge/make_reference.py

It writes ``tests/merge/reference/mergekit-0.1.5.safetensors`` (inputs and outputs) and
``mergekit-0.1.5.json`` (the cases, and the number of entries mergekit's ``magnitude``
sparsification keeps for several densities and sizes). The test reads only these files,
so it runs without mergekit.

mergekit draws DARE's drops from torch's global generator; to compare whole DARE merges the
script swaps its Bernoulli mask for mira's seeded one (``_mira_keep`` below is a copy of
``mira.merge.methods.dare``'s stream) and keeps everything else of mergekit, in particular
its rescaling (``rescaled_masked_tensor``) and its combine step.
"""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekit import sparsify
from mergekit.merge_methods import generalized_task_arithmetic as gta
from mergekit.merge_methods.api import merge_tensors
from mergekit.merge_methods.slerp import slerp

OUT = Path(__file__).parent / "reference"
VERSION = "0.1.5"
SHAPE = (20, 40)
NAME = "model.layers.0.mlp.up_proj.weight"
SEED = 5


def _mira_keep(seed: int, name: str, index: int, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """mira's DARE mask for model ``index`` of tensor ``name`` (``stream_seed`` + ``drop_and_rescale``)."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.rand(shape, generator=generator, dtype=torch.float32) >= 1.0 - density


def tied_bf16(numel: int, seed: int) -> torch.Tensor:
    """Non-zero bf16 values from a set of 16 magnitudes: most entries tie with many others."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.randint(1, 17, (numel,), generator=gen).float() / 64
    sign = torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    return (magnitude * sign).to(torch.bfloat16)


def main() -> None:
    assert version("mergekit") == VERSION, f"mergekit {version('mergekit')} installed, not {VERSION}"
    OUT.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(SHAPE, generator=gen)
    models = [base + 0.1 * torch.randn(SHAPE, generator=gen) for _ in range(3)]
    tensors: dict[str, torch.Tensor] = {"base": base, **{f"model{i}": m for i, m in enumerate(models)}}
    cases: dict[str, dict] = {}

    def gta_case(key: str, method: str, weights, densities, **parameters) -> None:
        params = {"weight": list(weights), **parameters}
        if densities is not None:
            params["density"] = list(densities)
        tensors[key] = merge_tensors([base, *models], method, parameters=params, base_index=0).contiguous()
        cases[key] = {"method": method, "weights": list(weights), "densities": densities,
                      "parameters": parameters}

    weights = [1.0, 0.5, -0.3]  # a negative weight: agreement is judged on w_i * tau_i
    densities = [0.5, 0.3, 0.7]
    gta_case("ties", "ties", weights, densities)
    gta_case("ties_lambda_sum", "ties", weights, densities, normalize=False, **{"lambda": 0.8})
    gta_case("ties_rescale", "ties", [1.0, 0.5, 0.3], densities, rescale=True)
    gta_case("task_arithmetic", "task_arithmetic", weights, None)
    gta_case("task_arithmetic_normalize", "task_arithmetic", [1.0, 0.5, 0.3], None, normalize=True)
    # DARE with mira's drops (see the module docstring); mergekit's defaults otherwise
    original_sparsify = gta.sparsify
    calls = {"index": 0}

    def seeded_sparsify(tensor, density, method, rescale_norm=None, **kwargs):
        assert method == sparsify.SparsificationMethod.random
        index = calls["index"] % len(models)
        calls["index"] += 1
        if density >= 1:
            return tensor
        keep = _mira_keep(SEED, NAME, index, tuple(tensor.shape), density)
        return sparsify.rescaled_masked_tensor(tensor, keep.to(tensor.dtype), rescale_norm)

    gta.sparsify = seeded_sparsify
    try:
        for method in ("dare_ties", "dare_linear"):
            calls["index"] = 0
            gta_case(method, method, weights, densities)
            calls["index"] = 0
            gta_case(f"{method}_no_rescale", method, [1.0, 0.5, 0.3], densities, rescale=False)
            calls["index"] = 0
            gta_case(f"{method}_normalize", method, [1.0, 0.5, 0.3], densities, normalize=True)
    finally:
        gta.sparsify = original_sparsify
    # SLERP: t = 0 is the base, whatever its place among the inputs
    for t in (0.0, 0.3, 1.0):
        key = f"slerp_t{t}"
        tensors[key] = merge_tensors([models[0], base], "slerp", parameters={"t": t}, base_index=1).contiguous()
        cases[key] = {"method": "slerp", "inputs": ["model0", "base"], "base_index": 1, "t": t}
    tensors["slerp_direct"] = slerp(torch.tensor([0.3]), base.reshape(1, -1), models[1].reshape(1, -1)).reshape(SHAPE)
    # magnitude sparsification: entries kept on tied bf16 tensors
    kept = []
    for numel in (7, 100, 800, 3200, 4096):
        tensor = tied_bf16(numel, seed=numel)
        for density in (0.01, 0.1, 0.2, 0.29, 1 / 3, 0.5, 0.7, 0.999):
            count = int((sparsify.magnitude(tensor, density) != 0).sum())
            kept.append({"numel": numel, "density": density, "kept": count})
    save_file(tensors, OUT / f"mergekit-{VERSION}.safetensors")
    meta = {"mergekit": VERSION, "torch": torch.__version__, "shape": list(SHAPE), "dare_name": NAME,
            "dare_seed": SEED, "cases": cases, "magnitude_kept": kept}
    (OUT / f"mergekit-{VERSION}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(tensors)} tensors and {len(kept)} magnitude counts to {OUT}")


if __name__ == "__main__":
    main()
