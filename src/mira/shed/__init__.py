"""SHED: Shapley-based refinement of instruction data (He et al., NeurIPS 2024).

Pipeline, one algorithm per module:

* ``embed``: sentence embeddings of every record (all-MiniLM-L6-v2 by default; prompt and
  response embedded apart);
* ``cluster``: k-means; each cluster's proxy is the record nearest its centroid;
* ``shapley``: Monte-Carlo permutation Shapley values of the proxies (antithetic pairs, a
  position control variate), with a cache of v(S) and truncation;
* ``value``: v(S), a fixed-step LoRA fine-tune of a small model on S (paired batches across
  coalitions), scored on validation data;
* ``reliability``: standard errors, split-half rank correlation, noise, the verdict;
* ``select``: QOCS / QWCS selection to a budget (registry ``SELECTORS``);
* ``refine``: the pipeline (``refine(records, settings) -> RefineResult``);
* ``report``: refined JSONL, ``shed.json`` and a PNG of the values;
* ``federated``: ``refine_clients`` for the ``refine:`` section of a run config;
* ``cli``: ``mira refine``.
"""
from mira._lazy import lazy_exports

# Exports are loaded on first use (PEP 562), so `mira --help` does not import torch.
_EXPORTS = {
    "refine": "refine", "RefineResult": "refine", "write_outputs": "report", "SELECTORS": "select",
    "Selector": "select", "register_selector": "select", "ShedSettings": "settings",
    "monte_carlo_shapley": "shapley", "ShapleyResult": "shapley", "CachedValue": "shapley",
    "Reliability": "reliability", "assess": "reliability",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
