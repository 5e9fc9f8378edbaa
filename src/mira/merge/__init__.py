"""Merging models and LoRA adapters: linear, task arithmetic, TIES, DARE and SLERP.

Quick use::

    from mira.merge import merge
    merge("recipe.yaml", "runs/merged")            # or a dict in the same format
    merge({"merge_method": "linear", "models": ["runs/a", "runs/b"]}, "runs/soup")

The recipe format, the methods' formulas and the LoRA ``factors``/``delta`` spaces are
described in ``docs/merge.md``. Merges stream tensor by tensor (``mira.merge.engine``);
methods are classes in ``mira.merge.methods`` registered by name (``mira.merge.registry``).
"""
from mira._lazy import lazy_exports

# Exports are loaded on first use (PEP 562), so `mira --help` does not import torch.
_EXPORTS = {
    "DEFAULT_SHARD_MB": "engine", "MergeResult": "engine", "merge": "engine",
    "MergeParameters": "recipe", "MergeRecipe": "recipe", "ModelEntry": "recipe", "ModelParameters": "recipe",
    "load_recipe": "recipe", "MergeMethod": "registry", "MergeParams": "registry", "get_method": "registry",
    "method_names": "registry", "register_method": "registry", "merge_state_dicts": "state",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "DEFAULT_SHARD_MB",
    "MergeMethod",
    "MergeParameters",
    "MergeParams",
    "MergeRecipe",
    "MergeResult",
    "ModelEntry",
    "ModelParameters",
    "get_method",
    "load_recipe",
    "merge",
    "merge_state_dicts",
    "method_names",
    "register_method",
]
