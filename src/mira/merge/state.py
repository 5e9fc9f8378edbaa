"""Merging in-memory state dicts with the registered methods (no files involved).

Used where the tensors are already in memory, e.g. by the one-shot federated strategy,
which merges the clients' adapters once (``algorithm: {name: oneshot, merge: ties,
merge_params: {density: 0.5}}``). LoRA factors are merged key by key ("factors" space,
as FedAvg does); task-vector methods use ``base`` (the shared initial adapter).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from torch import Tensor

from mira.errors import MiraError
from mira.merge.registry import MergeMethod, MergeParams, get_method


PARAMS = {"lambda": "lam", "t": "t", "normalize": "normalize", "combine": "combine", "seed": "seed",
          "rescale": "rescale"}  # + density


def merge_params(method: str, params: Mapping[str, Any] | None, num_models: int) -> tuple[MergeMethod, MergeParams]:
    """The method registered as ``method`` and its ``MergeParams`` from ``params`` (``density`` and the
    keys of ``PARAMS``); raises ``MiraError`` for an unknown method or parameter."""
    params = dict(params or {})
    m = get_method(method)
    density = params.pop("density", None)
    if isinstance(params.get("rescale"), bool):  # mergekit's spelling: true is its L1-norm rescaling
        params["rescale"] = "l1" if params["rescale"] else "none"
    unknown = set(params) - set(PARAMS)
    if unknown:
        raise MiraError(f"unknown merge parameters {sorted(unknown)} for {method!r}", where="algorithm.merge_params")
    try:
        p = MergeParams(densities=tuple([float(density)] * num_models) if density is not None else None,
                        **{PARAMS[k]: v for k, v in params.items()})
    except (TypeError, ValueError) as e:
        raise MiraError(f"bad merge parameter for {method!r}: {e}", where="algorithm.merge_params") from None
    return m, p


def merge_state_dicts(method: str, states: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                      base: Mapping[str, Tensor] | None = None,
                      params: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    m, p = merge_params(method, params, len(states))
    m.validate(list(weights), p)
    if m.uses_base and base is None:
        raise MiraError(f"merge method {method!r} needs a base", where="algorithm.merge")
    out = {}
    for key in states[0]:
        merged = m.merge_tensor([s[key].float() for s in states], list(weights),
                                base[key].float() if base is not None else None, replace(p, name=key))
        out[key] = merged.to(states[0][key].dtype)
    return out
