"""The SHED pipeline: embed -> cluster -> Shapley values of the proxies -> select to a budget.

``refine(records, settings)`` is the Python API behind ``mira refine`` and the
federated ``refine:`` hook. Validation records for v(S) are either given
(``val_records``) or a seeded ``val_fraction`` (at most ``max_val``) of ``records``,
held out: they are never candidates, and the budget applies to the remaining records.
Everything random derives from ``settings.seed``, so the same seed gives the same subset.

Before the permutations, v(empty) and v(all proxies) are computed, then v(all proxies) and
v(all proxies but one group) again with ``noise_seeds`` other training seeds: the noise of one
v(S) and of one (paired) marginal. Unless ``tolerance`` is set, truncation stops a permutation
once what its remaining groups can add is below the noise of one marginal. After them, ``mira.shed.reliability``
judges the values (split-half rank correlation, standard errors, noise against spread);
the figures go into ``RefineResult.reliability`` and ``shed.json``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from mira.data.records import Record
from mira.errors import MiraError
from mira.shed.cluster import Clustering, kmeans
from mira.shed.embed import embed_records
from mira.shed.reliability import Reliability, assess
from mira.shed.select import select
from mira.shed.settings import ShedSettings
from mira.shed.shapley import CachedValue, ProgressFn, ShapleyResult, ValueFn, group_orders, monte_carlo_shapley

LogFn = Callable[[str], None]
ValueFactory = Callable[[list[Record], list[Record]], ValueFn]
"""``factory(proxy_records, val_records) -> v`` with ``v(frozenset of cluster ids) -> float``."""


@dataclass
class RefineResult:
    """The refined subset and everything needed to explain it."""

    records: list[Record]  # the selected records, in input order
    indices: list[int]  # their positions in the input ``records``
    candidates: list[int]  # input positions that could be selected (all but validation)
    val_indices: list[int]  # input positions held out for validation (empty if val_records given)
    clustering: Clustering  # over the candidates (point i = candidates[i])
    shapley: ShapleyResult  # one value per cluster (player c = cluster c's proxy)
    settings: ShedSettings
    budget_count: int
    group_size: int
    selection_order: list[int]  # input positions in the order the strategy picked them
    reliability: Optional[Reliability] = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def values(self) -> np.ndarray:
        """Shapley value of each cluster's proxy."""
        return self.shapley.values

    def proxy_indices(self) -> list[int]:
        """Input positions of the cluster proxies."""
        return [self.candidates[p] for p in self.clustering.proxies]

    def report(self) -> dict:
        """A JSON-serialisable summary (written as ``shed.json``)."""
        chosen = set(self.indices)
        cand = np.asarray(self.candidates)
        stderr = self.shapley.stderr
        clusters = []
        for c, members in enumerate(self.clustering.members):
            positions = cand[members]
            clusters.append({"id": c, "size": len(members), "proxy": int(positions[0]),
                             "value": float(self.values[c]), "stderr": float(stderr[c]),
                             "selected": int(sum(int(p) in chosen for p in positions))})
        sh = self.shapley
        return {
            "method": "shed",
            "settings": self.settings.model_dump(mode="json"),
            "n_candidates": len(self.candidates),
            "n_validation": len(self.val_indices),
            "budget_count": self.budget_count,
            "group_size": self.group_size,
            "clusters": clusters,
            "chosen": self.indices,
            "selection_order": self.selection_order,
            "validation_indices": self.val_indices,
            "shapley": {"v_empty": sh.v_empty, "v_full": sh.v_full, "evaluations": sh.evaluations,
                        "cache_hits": sh.cache_hits, "truncated_groups": sh.truncated_groups,
                        "total_groups": sh.total_groups, "tolerance": sh.tolerance, "antithetic": sh.antithetic,
                        "centered": sh.centered, "iterations": sh.iteration_log},
            "reliability": self.reliability.to_dict() if self.reliability is not None else None,
            "wall_s": self.timings.get("total_s"),
            "timings_s": self.timings,
        }


def check_records(records: Sequence[Record], where: str = "data") -> None:
    """``MiraError`` for an empty data set or a record without instruction or output text."""
    if not records:
        raise MiraError("the data set is empty", where=where)
    for i, r in enumerate(records):
        for name in ("instruction", "output"):
            text = getattr(r, name, None)
            if not isinstance(text, str) or not text.strip():
                raise MiraError(f"record {i} (0-based, in input order) has no {name} text", where=where)


def split_validation(n: int, s: ShedSettings) -> tuple[list[int], list[int]]:
    """Seeded ``(candidates, validation)`` positions: ``val_fraction`` of ``n`` (1..max_val) held out."""
    if n < 2:
        raise MiraError(f"need at least 2 records to hold some out for validation, got {n} "
                        "(or give validation records)", where="data")
    n_val = min(s.max_val, n - 1, max(1, round(s.val_fraction * n)))
    perm = np.random.default_rng([s.seed, 1]).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


def standardized(values: np.ndarray) -> np.ndarray:
    """Z-scores of ``values`` (all zeros when they are constant)."""
    std = float(np.std(values))
    return (values - np.mean(values)) / std if std > 0 else np.zeros_like(values)


def refine(records: Sequence[Record], settings: ShedSettings | None = None, *,
           val_records: Optional[Sequence[Record]] = None, embeddings: Optional[np.ndarray] = None,
           value_factory: Optional[ValueFactory] = None, proxy=None, progress: Optional[ProgressFn] = None,
           log: LogFn = lambda m: None) -> RefineResult:
    """Select a budget of ``records`` with SHED.

    ``embeddings`` (one row per record, in order) skips step 1. ``value_factory(proxy_records,
    val_records)`` replaces the LoRA value function: it returns ``v`` on frozensets of
    cluster ids, where cluster ``c``'s proxy is ``proxy_records[c]`` (for tests and custom
    scores). ``proxy`` is a loaded ``ProxyModel`` to reuse across calls.
    """
    s = settings or ShedSettings()
    t_start = time.perf_counter()
    check_records(records)
    if val_records is not None:
        check_records(val_records, where="validation data")
        candidates, val_idx = list(range(len(records))), []
        val = list(val_records)
    else:
        candidates, val_idx = split_validation(len(records), s)
        val = [records[i] for i in val_idx]
    count = s.budget_count(len(candidates), held_out=len(val_idx))
    n_clusters = s.cluster_count(len(candidates))
    if embeddings is not None and (embeddings.ndim != 2 or len(embeddings) != len(records)):
        raise MiraError(f"embeddings have shape {embeddings.shape}; expected one row per record ({len(records)})",
                        where="embeddings")
    cand_records = [records[i] for i in candidates]
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if embeddings is None:
        log(f"embedding {len(cand_records)} records with {s.embedder}")
        emb = embed_records(cand_records, s.embedder, s.embed_batch_size, s.embed_max_length, s.embed_fields)
    else:
        emb = np.asarray(embeddings)[candidates]
    timings["embed_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clustering = kmeans(emb, n_clusters, seed=s.seed)
    timings["cluster_s"] = time.perf_counter() - t0
    if clustering.k < n_clusters:
        log(f"k-means found {clustering.k} distinct clusters (asked for {n_clusters}: duplicated records)")
    group = min(s.group_count(clustering.k), clustering.k)

    t0 = time.perf_counter()
    proxy_records = [cand_records[p] for p in clustering.proxies]
    if value_factory is not None:
        value_fn = value_factory(proxy_records, val)
    else:
        from mira.shed.value import LoraValue, ProxyModel

        proxy = proxy or ProxyModel.load(s)
        # each cluster's representatives: its proxy and (proxy_size > 1) the next nearest members
        reps = [m[: s.proxy_size].tolist() for m in clustering.members]
        proxy_set = {i for r in reps for i in r}
        warm = [r for i, r in enumerate(cand_records) if i not in proxy_set]
        background = []
        if s.background:
            pick = np.random.default_rng([s.seed, 3]).permutation(len(warm))[: s.background]
            background = [warm[i] for i in sorted(pick.tolist())]
            if len(background) < s.background:
                log(f"background: {len(background)} non-proxy records (all there are; background {s.background})")
        players = [[cand_records[i] for i in r] for r in reps]  # one record each with proxy_size 1: the proxies
        if s.proxy_size > 1:
            log(f"v(S) trains on up to {s.proxy_size} members of each cluster ({len(proxy_set)} records)")
        value_fn = LoraValue(proxy, players, val, s, warm, log, background_records=background)
    timings["value_setup_s"] = time.perf_counter() - t0
    cached = value_fn if isinstance(value_fn, CachedValue) else CachedValue(value_fn)
    try:
        t0 = time.perf_counter()
        everyone = frozenset(range(clustering.k))
        v_empty, v_full = cached(frozenset()), cached(everyone)
        cached_before = cached.seconds
        noise, marginals = [v_full], []
        evaluate = getattr(cached.fn, "evaluate", None)
        t_noise = time.perf_counter()
        if evaluate is not None and s.noise_seeds:
            # the noise of one v(S): v(N) under other training seeds; and of one marginal v(N) - v(N - G), G = the
            # group the first permutation adds last (so v(N - G) under the run's own seed is reused by the run)
            noise += [float(evaluate(everyone, s.seed + 1 + i)) for i in range(s.noise_seeds)]
            if clustering.k > group:
                last = group_orders(clustering.k, group, 1, s.seed, False)[0][-1]
                rest = everyone.difference(last.tolist())
                without = [cached(rest)] + [float(evaluate(rest, s.seed + 1 + i)) for i in range(s.noise_seeds)]
                marginals = [a - b for a, b in zip(noise, without)]
        noise_seconds = time.perf_counter() - t_noise - (cached.seconds - cached_before)
        noise_sd = float(np.std(noise, ddof=1)) if len(noise) > 1 else 0.0
        marginal_sd = float(np.std(marginals, ddof=1)) if len(marginals) > 1 else 0.0
        scale = abs(v_full - v_empty)
        if s.tolerance is not None:
            tolerance = s.tolerance
        else:  # truncate once what the groups left can add is below the noise of one (paired) marginal
            tolerance = min(0.5, marginal_sd / scale) if scale > 0 else 0.0
        timings["noise_s"] = time.perf_counter() - t0
        if len(noise) > 1:
            log(f"v(empty) {v_empty:.4f}, v(all {clustering.k} proxies) {v_full:.4f}; noise over {len(noise)} "
                f"training seeds: sd {noise_sd:.4f} of one v(S), {marginal_sd:.4f} of one marginal")
        log(f"Shapley values of {clustering.k} proxies: {s.iterations} iterations"
            f"{' (antithetic pairs)' if s.antithetic else ''}, groups of {group}, truncation tolerance "
            f"{tolerance:.3g} of |v(N) - v(empty)|")
        unit_value = None
        if s.train_seeds == "per_unit":
            if evaluate is None:
                raise MiraError("train_seeds: per_unit needs a value function with evaluate(coalition, seed)",
                                where="train_seeds")
            # unit u trains with seed + 1000 + u (the noise check uses seed + 1 .. seed + noise_seeds)
            unit_value = lambda u: (lambda c: float(evaluate(c, s.seed + 1000 + u)))  # noqa: E731
        shap = monte_carlo_shapley(clustering.k, cached, iterations=s.iterations, group_size=group, seed=s.seed,
                                   tolerance=tolerance, credit=s.credit, antithetic=s.antithetic, center=s.center,
                                   progress=progress, unit_value=unit_value)
    finally:
        restore = getattr(cached.fn, "restore", None)
        if restore:  # leave the shared proxy model's adapter as we found it (fresh)
            restore()
    timings["shapley_s"] = shap.seconds
    extra = len(noise) - 1 + max(0, len(marginals) - 1)  # evaluations outside the cache (other seeds)
    # per-unit seeds: the permutations' v(S) are outside ``cached``; shap.seconds is (nearly all) their time
    eval_seconds = cached.seconds + noise_seconds + (shap.seconds if s.train_seeds == "per_unit" else 0.0)
    per_eval = eval_seconds / max(1, shap.evaluations + extra)
    reliability = assess(shap, threshold=s.reliability_threshold, noise_values=noise if len(noise) > 1 else (),
                         marginal_noise=marginals, evaluations=shap.evaluations + extra, cache_hits=shap.cache_hits,
                         seconds_per_evaluation=per_eval)

    t0 = time.perf_counter()
    scores = standardized(shap.values) if s.standardize else shap.values
    picked = select(s.strategy, clustering, scores, count, seed=s.seed, beta=s.beta)
    timings["select_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    order = [candidates[p] for p in picked]
    indices = sorted(order)
    return RefineResult(records=[records[i] for i in indices], indices=indices, candidates=candidates,
                        val_indices=val_idx, clustering=clustering, shapley=shap, settings=s, budget_count=count,
                        group_size=group, selection_order=order, reliability=reliability, timings=timings)
