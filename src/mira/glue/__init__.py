"""Model-GLUE: from a zoo of models or LoRA adapters to one strong model.

Quick use::

    from mira.glue import run_glue
    result = run_glue("zoo.yaml", "runs/glue")     # or a dict in the same format

Steps: cluster the members (``similarity``), merge inside each cluster with a strategy
(``strategies``: heuristic_average, heuristic_coefficient, heuristic_similarity,
evolutionary), mix the cluster merges with a hidden-state router (``router``) or per
sequence on one base (``lora_mixture``), and report (``report``). See ``docs/glue.md``.
"""
from mira._lazy import lazy_exports

# Exports are loaded on first use (PEP 562), so `mira --help` does not import torch.
_EXPORTS = {
    "load_eval_set": "pipeline", "run_glue": "pipeline", "HiddenRouter": "router",
    "Evaluator": "scoring", "score_of": "scoring", "sequence_losses": "scoring", "task_losses": "scoring",
    "cluster": "similarity", "column_cosine": "similarity", "similarity": "similarity",
    "similarity_matrix": "similarity", "Selection": "strategies", "Strategy": "strategies",
    "StrategyOptions": "strategies", "get_strategy": "strategies", "register_strategy": "strategies",
    "strategy_names": "strategies", "Member": "zoo", "ZooSpec": "zoo", "load_zoo": "zoo",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
