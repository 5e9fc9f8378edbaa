"""``mira`` (Elbakary et al., 2024): federated multi-task LoRA with a Laplacian step.

Objective: ``sum_k f_k(w_k) + lambda * R(W)``, ``R(W) = 1/2 sum_k sum_{l!=k} a_kl ||w_k - w_l||^2``.

Each client k owns a personalised adapter dW_k = {A_k, B_k}; the server stores the
latest dW_k of every client. In round t each sampled client receives **its own** dW_k,
trains R local steps to dW_{k,R} and uploads it. The server then sets, for every
sampled k::

    dW_k <- dW_{k,R} - eta * lambda * sum_{l != k} a_kl (dW_{k,R} - dW_l)

where dW_l is client l's fresh upload if l was sampled this round, else the stored one
(``neighbors: all``, the paper's equation), or only this round's sampled clients
(``neighbors: sampled``, as the authors' code). Unsampled clients keep their adapter.
The regularised dW_k is what client k starts from next time (the authors' code
reloads the un-regularised one, so its regulariser never reaches training; not here).

**The step is kept safe against the graph actually used.** Client k's new adapter is
``(1 - s*d_k) dW_{k,R} + s * sum_l a_kl dW_l`` with ``s = eta*lambda`` and ``d_k`` its row sum
over the neighbours used this round; for ``s*d_k >= 1`` its own weight is ``<= 0`` and the step
overshoots. Two checks:

* a **static** graph (``random``, ``uniform``, ``file``) is checked once, at configuration
  time: ``eta*lambda*max_k sum_l a_kl >= 1`` is refused (as before);
* every round, the step is checked against that round's graph and neighbours:
  ``d_max = max over the updated clients of d_k``; if ``s*d_max >= 1``, that round uses
  ``s' = 0.9/d_max`` instead (own weight at least 0.1), and ``rounds.json`` records
  ``step_scaled: true`` with ``step`` (the one used), ``step_configured`` and ``max_row_sum``.
  For a static graph that passed the first check this never triggers; for the ``similarity``
  graph (re-estimated every round, row sums up to K-1) this replaces the old configuration-time
  bound ``eta*lambda*(K-1) < 1``, which refused large lambdas although real row sums are smaller.

**``space: delta``** (for clients of different LoRA ranks, ``lora.ranks``; also allowed with one rank).
The step above (``space: factors``, the default, unchanged) moves ``A`` and ``B`` separately, which
needs every client to have the same shapes. In delta space it is taken on the layers' actual deltas
``D_k = s_k B_k A_k`` (PEFT's ``s_k = alpha / r_k``), in every module::

    D_k <- (1 - eta*lambda*d_k) D_{k,R} + eta*lambda * sum_{l != k} a_kl D_l

an exact linear combination of products of ranks ``r_k`` and ``r_l``, which is re-factored to client
k's own rank by truncated SVD of the stacked factors (``strategies/ranks.py``; no ``out x in`` matrix is
formed), ``B_k A_k = D_k,{r_k} / s_k``. The truncation is the one approximation; its relative error is
logged (``svd_error_mean`` / ``_max`` over the updated clients and modules). A client with no
neighbour this round keeps its uploaded factors as they are. ``graph: similarity`` compares flattened
adapters and so needs one rank for all clients.
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mira.errors import MiraError
from mira.federated.graph import SIMILARITIES, build_graph
from mira.federated.strategies.base import FitIns, FitRes, Strategy, register_strategy
from mira.models.adapters import flatten


class MiraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(0.5, ge=0, alias="lambda")
    eta: Optional[float] = Field(None, gt=0, description="server step; default lr * R")
    neighbors: Literal["all", "sampled"] = "all"
    graph: str = "random"
    graph_file: Optional[str] = None
    similarity: Literal["cosine", "centered", "profile"] = "cosine"  # graph: similarity only (see mira.federated.graph)
    similarity_average: bool = False
    # graph: similarity only: also run all six estimators (cosine/centered/profile x latest/average) on the same
    # updates each round and log each one's task AUC (rounds.json graph_auc_estimators); measurement only
    estimator_diagnostics: bool = False
    space: Literal["factors", "delta"] = "factors"  # delta: the step on s_k B_k A_k, for per-client ranks


@register_strategy
class Mira(Strategy):
    name = "mira"
    Params = MiraParams
    personalized = True

    def __init__(self, params, ctx, init):
        super().__init__(params, ctx, init)
        if params.space == "delta" and ctx.ranks:  # each client starts from its own rank's initial adapter
            self.adapters = {cid: dict(ctx.inits[ctx.ranks[cid]]) for cid in range(ctx.num_clients)}
        else:
            self.adapters = {cid: dict(self.init) for cid in range(ctx.num_clients)}
        self.graph = self._check(params, ctx)
        self.eta = params.eta if params.eta is not None else ctx.lr * ctx.local_steps
        self.graphs: list[np.ndarray] = []  # the graph used in each round
        self.shadows = {}  # estimator_diagnostics: the other estimators, fed the same updates, never used
        if params.estimator_diagnostics:
            self.shadows = {f"{sim}{'+average' if avg else ''}": build_graph(
                "similarity", ctx.num_clients, ctx.seed, similarity=sim, similarity_average=avg)
                for sim in SIMILARITIES for avg in (False, True)}

    @classmethod
    def supports_ranks(cls, params) -> bool:
        return params.space == "delta"

    @classmethod
    def check_setup(cls, params, ctx) -> None:
        cls._check(params, ctx)

    @staticmethod
    def _check(params, ctx):
        """Build the graph and refuse a static one on which the step would overshoot."""
        if params.graph != "similarity" and (params.similarity != "cosine" or params.similarity_average):
            raise MiraError("similarity and similarity_average apply to graph: similarity only",
                            where="algorithm.similarity")
        if params.estimator_diagnostics and params.graph != "similarity":
            raise MiraError("estimator_diagnostics applies to graph: similarity only", where="algorithm.estimator_diagnostics")
        if params.graph == "similarity" and ctx.ranks and len(set(ctx.ranks)) > 1:
            raise MiraError("graph: similarity compares flattened adapters, so it needs one LoRA rank for all "
                            "clients; use a static graph with lora.ranks", where="algorithm.graph")
        graph = build_graph(params.graph, ctx.num_clients, ctx.seed, params.graph_file,
                            similarity=params.similarity, similarity_average=params.similarity_average)
        if graph.dynamic:  # checked against each round's graph instead (see the module docstring)
            return graph
        eta = params.eta if params.eta is not None else ctx.lr * ctx.local_steps
        step = eta * params.lambda_ * graph.max_degree_bound()
        if step >= 1:
            raise MiraError(
                f"eta*lambda*max_k(sum_l a_kl) = {eta:g}*{params.lambda_:g}*{graph.max_degree_bound():g} = "
                f"{step:.3g} >= 1: the Laplacian step would overshoot; lower algorithm.lambda or algorithm.eta",
                where="algorithm")
        return graph

    def configure_fit(self, cid: int) -> FitIns:
        return FitIns(adapter=self.adapters[cid])

    def aggregate_fit(self, rnd: int, results: dict[int, FitRes]) -> dict:
        if self.graph.dynamic:
            updates = {cid: flatten(r.adapter) - flatten(self.adapters[cid]) for cid, r in results.items()}
            self.graph.update(updates)
            for g in self.shadows.values():
                g.update(updates)
        a = self.graph.a
        fresh = {cid: r.adapter for cid, r in results.items()}
        neighbours = range(self.ctx.num_clients) if self.p.neighbors == "all" else sorted(fresh)
        configured = step = self.eta * self.p.lambda_
        row_sums = [sum(float(a[k, l]) for l in neighbours if l != k) for k in fresh]
        max_row = max(row_sums, default=0.0)
        scaled = step * max_row >= 1
        if scaled:  # this round's graph would make the step overshoot: keep the own weight at 0.1
            step = 0.9 / max_row
        new, extra = {}, {}
        if self.p.space == "delta":
            new, extra = self._delta_step(fresh, neighbours, a, step)
        else:
            for k, wk in fresh.items():
                pulled = {}
                for key, value in wk.items():
                    lap = torch.zeros_like(value)
                    for l in neighbours:
                        if l != k and a[k, l] != 0:
                            wl = fresh[l] if l in fresh else self.adapters[l]
                            lap += float(a[k, l]) * (value - wl[key])
                    pulled[key] = value - step * lap
                new[k] = pulled
        self.adapters.update(new)
        self.graphs.append(a.copy())
        return {"graph_edges": int((a > 0).sum() // 2), "step": float(step), "step_configured": float(configured),
                "max_row_sum": float(max_row), "step_scaled": bool(scaled), **extra}

    def _delta_step(self, fresh: dict, neighbours, a, step: float) -> tuple[dict, dict]:
        """``space: delta``: each updated client's new factors (its own rank) and the truncation errors."""
        from mira.federated.strategies.products import lora_pairs
        from mira.federated.strategies.ranks import error_summary, peft_scale, rank_of, refactor_sum

        modules = lora_pairs(self.ctx.keys or list(self.init))
        alpha = self.ctx.lora_alpha
        new, errors = {}, {}
        for k, wk in fresh.items():
            rk = rank_of(wk)
            pulls = [(float(a[k, l]), fresh[l] if l in fresh else self.adapters[l])
                     for l in neighbours if l != k and a[k, l] != 0]
            if not pulls or step == 0:
                new[k] = wk
                continue
            own = 1.0 - step * sum(c for c, _ in pulls)
            # in units of client k's scale: D_k / s_k = own B_k A_k + sum_l step a_kl (s_l / s_k) B_l A_l
            terms = [(own, wk)] + [(step * c * peft_scale(alpha, rank_of(wl)) / peft_scale(alpha, rk), wl)
                                   for c, wl in pulls]
            merged, errs = refactor_sum(terms, modules, [rk], {rk: wk})
            new[k] = merged[rk]
            errors.setdefault(rk, []).extend(errs[rk])
        return new, error_summary(errors, per_rank=False) if errors else {}

    def adapter_for(self, cid: int):
        return self.adapters[cid]

    @property
    def shadow_graphs(self) -> dict[str, np.ndarray]:
        """With ``estimator_diagnostics``: each estimator's current graph on the same updates."""
        return {name: g.a for name, g in self.shadows.items()}

    def state_dict(self) -> dict:
        s = {"adapters": self.adapters, "graphs": self.graphs}
        if self.graph.dynamic:
            s["graph"] = self.graph.state_dict()
        if self.shadows:
            s["shadows"] = {name: g.state_dict() for name, g in self.shadows.items()}
        return s

    def load_state_dict(self, state: dict) -> None:
        self.adapters, self.graphs = state["adapters"], state["graphs"]
        if self.graph.dynamic:
            self.graph.load_state_dict(state["graph"])
        for name, g in self.shadows.items():
            g.load_state_dict(state["shadows"][name])
