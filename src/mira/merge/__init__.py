"""Merging models and LoRA adapters: linear, task arithmetic, TIES, DARE and SLERP.

Quick use::

    from mira.merge import merge
    merge("recipe.yaml", "runs/merged")            # or a dict in the same format
    merge({"merge_method": "linear", "models": ["runs/a", "runs/b"]}, "runs/soup")

The recipe format, the methods' formulas and the LoRA ``factors``/``delta`` spaces are
described in ``docs/merge.md``. Merges stream tensor by tensor (``mira.merge.engine``);
methods are classes in ``mira.merge.methods`` registered by name (``mira.merge.registry``).
"""
from mira.merge.engine import DEFAULT_SHARD_MB, MergeResult, merge
from mira.merge.recipe import MergeParameters, MergeRecipe, ModelEntry, ModelParameters, load_recipe
from mira.merge.registry import MergeMethod, MergeParams, get_method, method_names, register_method
from mira.merge.state import merge_state_dicts

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
