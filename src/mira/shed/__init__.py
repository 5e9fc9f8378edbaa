"""SHED: Shapley-based refinement of instruction data (He et al., NeurIPS 2024).

Pipeline, one algorithm per module:

* ``embed``: sentence embeddings of every record (all-MiniLM-L6-v2 by default);
* ``cluster``: k-means; each cluster's proxy is the record nearest its centroid;
* ``shapley``: Monte-Carlo permutation-removal Shapley values of the proxies, with a
  cache of v(S) and truncation;
* ``value``: v(S), a short LoRA fine-tune of a small model on S, scored on validation data;
* ``select``: QOCS / QWCS selection to a budget (registry ``SELECTORS``);
* ``refine``: the pipeline (``refine(records, settings) -> RefineResult``);
* ``report``: refined JSONL, ``shed.json`` and a PNG of the values;
* ``federated``: ``refine_clients`` for the ``refine:`` section of a run config;
* ``cli``: ``mira refine``.
"""
from mira.shed.refine import RefineResult, refine
from mira.shed.report import write_outputs
from mira.shed.select import SELECTORS, Selector, register_selector
from mira.shed.settings import ShedSettings
from mira.shed.shapley import CachedValue, ShapleyResult, monte_carlo_shapley

__all__ = ["refine", "RefineResult", "ShedSettings", "write_outputs", "SELECTORS", "Selector", "register_selector",
           "monte_carlo_shapley", "ShapleyResult", "CachedValue"]
