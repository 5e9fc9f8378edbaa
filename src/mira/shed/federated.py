"""SHED inside a federated run: each client refines its own training data, locally.

``Workspace.load`` calls ``refine_clients(clients, cfg, log_fn)`` when the run config has
a ``refine:`` section, e.g.::

    refine:
      method: shed
      budget_fraction: 0.5   # any ShedSettings field: budget_records, strategy, clusters, iterations, ...
      strategy: qocs

Unset options default to the run's own settings where they exist (``model.path``,
``lora.r``/``alpha``/``target_modules``, ``data.max_length``, ``federation.batch_size``, ``seed``)
and to ``ShedSettings`` otherwise; not ``federation.lr``, which is an AdamW rate for the clients'
training while v(S) trains with SGD (``refine.lr`` sets its rate). Each client uses only its own ``train``
records (its validation records for v(S) are held out from them, never its test split),
with a seed derived from ``(seed, client id)``; the proxy model and the embedding model
are loaded once and reused for every client.

Every client's refinement reports its own reliability (``mira.shed.reliability``): one log line
per client with the split-half rank correlation, the mean standard error against the spread of
the values, the noise of one v(S), v(S) evaluations, cache hits and wall time, and a warning line
when that client's values are noise (its selection is then a random sample of its data).
``refine_clients(..., reports=[])`` also collects them as dicts.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import numpy as np

from mira.data.partition import ClientData
from mira.errors import MiraError
from mira.shed.refine import refine
from mira.shed.settings import ShedSettings

SUPPORTED_METHODS = ("shed",)


def hook_settings(cfg) -> ShedSettings:
    """Validate ``cfg.refine`` into ``ShedSettings`` (errors name ``refine.<field>``)."""
    hook = cfg.refine
    if hook.method not in SUPPORTED_METHODS:
        raise MiraError(f"unknown refinement method {hook.method!r}; choose one of {list(SUPPORTED_METHODS)}",
                        where="refine.method")
    defaults = {"model": cfg.model.path, "device": cfg.model.device, "lora_r": cfg.lora.r,
                "lora_alpha": cfg.lora.alpha, "target_modules": cfg.lora.target_modules,
                "max_length": cfg.data.max_length, "template": cfg.data.template,
                "batch_size": cfg.federation.batch_size, "seed": cfg.seed}
    return ShedSettings.from_mapping({**defaults, **dict(hook.model_extra or {})}, where="refine")


def client_seed(seed: int, client_id: int) -> int:
    """A per-client seed derived from the run seed (stable across runs and resumes)."""
    return int(np.random.SeedSequence([int(seed), int(client_id), 5_003]).generate_state(1)[0] % (2**31))


def client_report(c: ClientData, result, seconds: float) -> dict:
    """One client's refinement figures (``refine_clients(reports=...)``)."""
    rel = result.reliability
    return {"client": c.id, "task": c.task, "kept": len(result.records), "of": len(c.train),
            "clusters": result.clustering.k, "wall_s": seconds,
            "reliability": rel.to_dict() if rel is not None else None}


def reliability_line(rel) -> str:
    r = "n/a" if rel.split_half is None else f"{rel.split_half:.2f}"
    noise = "n/a" if rel.noise_sd is None else f"{rel.noise_sd:.4g}"
    return (f"split-half r {r} (threshold {rel.threshold:g}), mean SE {rel.mean_stderr:.4g} vs spread "
            f"{rel.value_spread:.4g}, v(S) noise sd {noise}, {rel.evaluations} v(S) evaluations, "
            f"{rel.cache_hits} cache hits")


def refine_clients(clients: list[ClientData], cfg, log_fn: Callable[[str], None] = lambda m: None,
                   reports: Optional[list] = None) -> list[ClientData]:
    """Return ``clients`` with each client's ``train`` replaced by its SHED-refined subset."""
    base = hook_settings(cfg)
    proxy = None
    out: list[ClientData] = []
    for c in clients:
        s = base.model_copy(update={"seed": client_seed(base.seed, c.id)})
        t0 = time.perf_counter()
        if proxy is None:
            from mira.shed.value import ProxyModel

            proxy = ProxyModel.load(base)
        try:
            result = refine(c.train, s, proxy=proxy)
        except MiraError as e:
            context = f"refine (client {c.id}, task {c.task!r}, {len(c.train)} train records)"
            raise MiraError(str(e), where=context) from None
        seconds = time.perf_counter() - t0
        rel = result.reliability
        log_fn(f"refine: client {c.id} ({c.task}) keeps {len(result.records)}/{len(c.train)} records "
               f"(SHED {s.strategy}, {result.clustering.k} clusters, {seconds:.1f}s); {reliability_line(rel)}")
        if not rel.reliable:
            log_fn(f"refine: client {c.id} ({c.task}): {rel.verdict}")
        if reports is not None:
            reports.append(client_report(c, result, seconds))
        out.append(dataclasses.replace(c, train=result.records))
    return out
