"""Model-GLUE: from a zoo of models or LoRA adapters to one strong model.

Quick use::

    from mira.glue import run_glue
    result = run_glue("zoo.yaml", "runs/glue")     # or a dict in the same format

Steps: cluster the members (``similarity``), merge inside each cluster with a strategy
(``strategies``: heuristic_average, heuristic_coefficient, heuristic_similarity,
evolutionary), mix the cluster merges with a hidden-state router (``router``) or per
sequence on one base (``lora_mixture``), and report (``report``). See ``docs/glue.md``.
"""
from mira.glue.pipeline import load_eval_set, run_glue
from mira.glue.router import HiddenRouter
from mira.glue.scoring import Evaluator, score_of, sequence_losses, task_losses
from mira.glue.similarity import cluster, column_cosine, similarity, similarity_matrix
from mira.glue.strategies import (
           Selection,
           Strategy,
           StrategyOptions,
           get_strategy,
           register_strategy,
           strategy_names,
)
from mira.glue.zoo import Member, ZooSpec, load_zoo

__all__ = ["Evaluator", "HiddenRouter", "Member", "Selection", "Strategy", "StrategyOptions", "ZooSpec", "cluster",
           "column_cosine", "get_strategy", "load_eval_set", "load_zoo", "register_strategy", "run_glue", "score_of",
           "sequence_losses", "similarity", "similarity_matrix", "strategy_names", "task_losses"]
