"""``run_glue``: the Model-GLUE recipe end to end, from a zoo to one strong model.

1. Load the zoo, score every member on the validation set (per task).
2. Cluster the members (architecture, then weight similarity; ``mira.glue.similarity``).
3. Merge each cluster with the chosen strategy (``mira.glue.strategies``), scoring
   candidate merges in memory.
4. Mix the cluster merges: a model-level hidden-state router and, for adapters, a
   LoRA-level per-sequence mixture.
5. Write the cluster merges, the router, ``glue.json``, ``glue.md`` and ``glue.png``
   (into a temporary folder renamed into place at the end, each file written atomically).
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mira.data.prompts import TokenizedDataset, tokenize_records
from mira.data.records import Record, load_records
from mira.errors import MiraError
from mira.glue.lora_mixture import LoraMixture
from mira.glue.router import HiddenRouter, best_expert, normalised_entropy, routed_losses
from mira.glue.scoring import Evaluator, SeqLosses, score_of, task_losses
from mira.glue.similarity import cluster, matrices_of, matrices_similarity, similarity_matrix
from mira.glue.strategies import StrategyOptions, get_strategy, memoised
from mira.glue.zoo import EvalSetSpec, load_members, load_zoo, resolve
from mira.io import atomic_dir, atomic_torch_save

Log = Callable[[str], None]


def load_eval_set(es: EvalSetSpec, root: Path, tokenizer, where: str) -> TokenizedDataset:
    """Records of an eval set: per task, the records a run with ``data.max_per_task = skip_per_task`` and
    ``data.seed = seed`` drew are dropped (exactly), the rest shuffled (seeded) and ``max_per_task`` kept."""
    import random

    from pydantic import ValidationError

    from mira.config import DataConfig

    raw: dict[str, Any] = dict(es.data) if es.data is not None else {"source": "json"}
    if es.path is not None:
        raw["path"] = str(resolve(es.path, root, f"{where}.path"))
    elif raw.get("path"):
        raw["path"] = str(resolve(str(raw["path"]), root, f"{where}.data.path"))
    raw["tasks"] = es.tasks or raw.get("tasks")
    raw["max_per_task"] = None
    try:
        cfg = DataConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise MiraError(err["msg"], where=f"{where}.data." + ".".join(str(x) for x in err["loc"])) from e
    records = load_records(cfg, seed=es.seed)
    by_task: dict[str, list[Record]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r)
    # skip_per_task: exactly the records a run with data.max_per_task = skip_per_task and data.seed = seed
    # drew (mira.data.records.load_records: one Random(seed), tasks in sorted order, rng.sample per task
    # when a task has more records; all of a task otherwise), by position, so duplicates count once each
    draw = random.Random(es.seed)
    rng = random.Random(es.seed + 1)
    chosen: list[Record] = []
    for task in sorted(by_task):
        group = list(by_task[task])
        if es.skip_per_task:
            n = len(group)
            drawn = set(draw.sample(range(n), es.skip_per_task)) if n > es.skip_per_task else set(range(n))
            group = [r for i, r in enumerate(group) if i not in drawn]
        rng.shuffle(group)
        group = group[: es.max_per_task]
        if not group:
            raise MiraError(f"no {task!r} records left after skip_per_task={es.skip_per_task}", where=where)
        chosen += group
    ds = tokenize_records(chosen, tokenizer, es.max_length, es.template, es.overflow)
    if not len(ds):
        raise MiraError(f"no example fits max_length {es.max_length} (template {es.template}, overflow {es.overflow})",
                        where=where)
    return ds


def _entry(name: str, kind: str, losses: dict[str, float], test: dict[str, float] | None, **extra: Any) -> dict:
    out = {"name": name, "kind": kind, "val": losses, "val_mean_loss": -score_of(losses), "val_score": score_of(losses)}
    if test is not None:
        out["test"] = test
        out["test_mean_loss"] = -score_of(test)
    out.update(extra)
    return out


def _save_model_state(evaluator: Evaluator, state: dict, folder: Path) -> None:
    if evaluator.kind == "adapter":
        evaluator.slot.save(state, folder)
    else:
        evaluator.load(state)
        evaluator.model.save_pretrained(str(folder))
        evaluator.tokenizer.save_pretrained(str(folder))


def run_glue(zoo: str | os.PathLike | dict, out_dir: str | os.PathLike, overwrite: bool = False,
             log: Log = lambda s: None) -> dict:
    """Run Model-GLUE on ``zoo`` and write the results to ``out_dir``; return the ``glue.json`` content."""
    t0 = time.perf_counter()
    spec, root = load_zoo(zoo)
    out = Path(out_dir)
    from mira.io import is_empty_dir, recover_dir

    from mira.userfiles import check_out_folder

    check_out_folder(out)  # a file is never replaced, even with --overwrite
    recover_dir(out)  # an interrupted --overwrite's old folder first, as `mira merge` does
    if not is_empty_dir(out) and not overwrite:
        raise MiraError(f"{out} exists and is not empty (use --overwrite)", where="--out")
    members, base_path = load_members(spec, root)
    strategy = get_strategy(spec.strategy.name)
    log(f"zoo: {len(members)} {members[0].kind}s; base {base_path}")
    ev = Evaluator(members, base_path, spec.batch_size, spec.strategy.method)
    val = load_eval_set(spec.validation, root, ev.tokenizer, "validation")
    test = load_eval_set(spec.test, root, ev.tokenizer, "test") if spec.test is not None else None
    val_tasks = [r.task for r in val.records]
    test_tasks = [r.task for r in test.records] if test is not None else []
    tasks = list(dict.fromkeys(val_tasks))

    def both(state) -> tuple[SeqLosses, SeqLosses | None]:
        return ev.losses(state, val), (ev.losses(state, test) if test is not None else None)

    def per_task(v: SeqLosses, t: SeqLosses | None) -> tuple[dict, dict | None]:
        return (task_losses(v.nll, v.tokens, val_tasks),
                task_losses(t.nll, t.tokens, test_tasks) if t is not None else None)

    # 1. every member
    entries: list[dict] = []
    member_val: list[dict[str, float]] = []
    member_losses: list[tuple[SeqLosses, SeqLosses | None]] = []
    for m in members:
        member_losses.append(both(m.state))
        v, t = per_task(*member_losses[-1])
        member_val.append(v)
        entries.append(_entry(m.name, "member", v, t, path=str(m.path), task=m.task))
        log(f"member {m.name}: val mean loss {-score_of(v):.4f}")
    if ev.kind == "model" and ev.base_state is not None:
        v, t = per_task(*both(ev.base_state))
        entries.append(_entry("base", "base", v, t))
    owned: list[list[str]] = []
    for i, m in enumerate(members):
        if m.task in tasks:
            owned.append([m.task])
        else:  # no declared task: the tasks on which this member is the best
            owned.append([task for task in tasks if min(range(len(members)), key=lambda j: member_val[j][task]) == i])
    scores = [score_of(v) for v in member_val]
    best_single = int(np.argmax(scores))

    # 2. clusters
    sim = similarity_matrix(members, ev.base_state)
    clusters = cluster(members, spec.cluster.threshold, sim)
    log(f"{len(clusters)} cluster(s) at threshold {spec.cluster.threshold}: {clusters}")

    # 3. selective merging inside each cluster
    options = StrategyOptions(budget=spec.strategy.budget, sigma=spec.strategy.sigma, seed=spec.seed)
    merged_states: list[dict] = []
    cluster_info: list[dict] = []
    expert_val: list[SeqLosses] = []
    expert_test: list[SeqLosses | None] = []
    for ci, idx in enumerate(clusters):
        states = [members[i].state for i in idx]
        search: dict = {}
        if len(idx) == 1:
            weights, trace = [1.0], []
        else:
            score = memoised(lambda w, states=states: ev.score(ev.merge(states, w), val))
            sub_sim = [[sim[a][b] for b in idx] for a in idx]
            mats = [matrices_of(ev.kind, s, ev.base_state) for s in states]

            def merge_similarity(w, i, states=states, mats=mats) -> float:
                return matrices_similarity(matrices_of(ev.kind, ev.merge(states, w), ev.base_state), mats[i])

            sel = strategy.select([scores[i] for i in idx], sub_sim, score,
                                  dataclasses.replace(options, merge_similarity=merge_similarity))
            weights = sel.weights
            search = sel.info
            trace = [dict(t, member=members[idx[t["member"]]].name) if "member" in t else t for t in sel.trace]
        state = ev.merge(states, weights)
        merged_states.append(state)
        v_l, t_l = member_losses[idx[0]] if len(idx) == 1 else both(state)
        expert_val.append(v_l)
        expert_test.append(t_l)
        v, t = per_task(v_l, t_l)
        name = f"cluster_{ci}"
        total = sum(weights)
        info = {"members": [members[i].name for i in idx], "weights": [float(w) / total for w in weights],
                "strategy": strategy.name if len(idx) > 1 else "single", "trace": trace,
                "tasks": sorted({task for i in idx for task in owned[i]})}
        if search:
            info["search"] = search
        cluster_info.append(info)
        entries.append(_entry(name, "cluster", v, t, **{k: info[k] for k in ("members", "weights", "strategy")}))
        log(f"{name}: {len(idx)} member(s), weights {[round(w, 3) for w in weights]}, val mean loss {-score_of(v):.4f}"
            + (f"; CMA-ES {search['generations']} generation(s) of {search['popsize']}, "
               f"{search['evaluations']}/{search['budget']} evaluations" if "generations" in search else ""))

    # 4. mixtures across clusters
    owner_of_task = {}
    for ci, info in enumerate(cluster_info):
        for task in info["tasks"]:
            owner_of_task.setdefault(task, ci)
    if ev.kind == "model":
        ev.load(ev.base_state if ev.base_state is not None else members[0].state)
    feats_val = ev.prompt_features(val)
    feats_test = ev.prompt_features(test) if test is not None else None
    owners = [owner_of_task.get(task, -1) for task in val_tasks]
    owners_test = [owner_of_task.get(task, -1) for task in test_tasks]
    mx = spec.mixture
    router = HiddenRouter.standardised(feats_val, owners, len(clusters),
                                       0.05 if mx.temperature == "auto" else float(mx.temperature))
    if mx.gate == "centroid" and mx.temperature == "auto" and len(clusters) > 1:
        router.calibrate(feats_val, owners)
    nll_val = np.stack([e.nll for e in expert_val], 1)
    targets = best_expert(nll_val, expert_val[0].tokens)

    def accuracy(feats, own) -> float | None:
        pairs = [(c, o) for c, o in zip(router.route(feats), own) if o >= 0]
        return float(np.mean([c == o for c, o in pairs])) if pairs else None

    router_init_acc = accuracy(feats_val, owners)
    fit_history = router.fit(feats_val, targets, mx.train_steps, mx.lr, spec.seed) if mx.gate == "centroid" else []
    if mx.gate == "linear" and len(clusters) > 1:
        fit_history = [router.fit_linear(feats_val, owners)]

    def routed(feats, losses: list[SeqLosses]) -> SeqLosses:
        nll = np.stack([e.nll for e in losses], 1)
        return SeqLosses(routed_losses(nll, losses[0].tokens, router.route(feats)), losses[0].tokens)

    r_val = routed(feats_val, expert_val)
    r_test = routed(feats_test, expert_test) if test is not None else None  # type: ignore[arg-type]
    v, t = per_task(r_val, r_test)
    routing = np.bincount(router.route(feats_val), minlength=len(clusters)).tolist()
    w_val = router.weights(feats_val)
    gate_info = {"gate": mx.gate, "temperature": router.temperature if mx.gate == "centroid" else None,
                 "val_accuracy": accuracy(feats_val, owners),
                 "test_accuracy": accuracy(feats_test, owners_test) if test is not None else None,
                 "val_weight_entropy": normalised_entropy(w_val),
                 "val_max_weight": float(w_val.max(-1).values.mean())}
    if test is not None:
        w_test = router.weights(feats_test)
        gate_info.update(test_weight_entropy=normalised_entropy(w_test),
                         test_max_weight=float(w_test.max(-1).values.mean()))
    entries.append(_entry("router", "router", v, t, routing_counts=routing, init_accuracy=router_init_acc,
                          train_steps=mx.train_steps, **gate_info))
    log(f"router ({mx.gate} gate): val mean loss {-score_of(v):.4f}; own-task routing accuracy val "
        f"{gate_info['val_accuracy']}, test {gate_info['test_accuracy']}; weight entropy "
        f"{gate_info['val_weight_entropy']:.3f} (1 = uniform)")
    if ev.kind == "adapter" and len(clusters) > 1:
        mix = LoraMixture(ev, merged_states)
        m_val = mix.losses(val, w_val)
        m_test = mix.losses(test, router.weights(feats_test)) if test is not None else None
        v, t = per_task(m_val, m_test)
        entries.append(_entry("lora_mixture", "lora_mixture", v, t, **gate_info))
        log(f"lora mixture: val mean loss {-score_of(v):.4f}")
        # the same experts with fixed uniform weights: the exact average of their deltas B @ A
        uniform = [1.0 / len(clusters)] * len(clusters)
        u_val = mix.fixed_losses(val, uniform)
        u_test = mix.fixed_losses(test, uniform) if test is not None else None
        v, t = per_task(u_val, u_test)
        entries.append(_entry("uniform_delta_average", "baseline", v, t))
        log(f"uniform delta average of the cluster merges: val mean loss {-score_of(v):.4f}")

    by_name = {e["name"]: e for e in entries}
    if len(clusters) == 1:
        final_name = "cluster_0"
    elif "lora_mixture" not in by_name or spec.mixture.kind == "router":
        final_name = "router"
    elif spec.mixture.kind == "lora":
        final_name = "lora_mixture"
    else:  # auto: the mixture with the lower validation loss
        final_name = min(("router", "lora_mixture"), key=lambda n: by_name[n]["val_mean_loss"])
    final = by_name[final_name]
    best = entries[best_single]
    result: dict[str, Any] = {
        "zoo": {"kind": ev.kind, "members": [m.name for m in members], "base_model": str(base_path) if base_path else None},
        "tasks": tasks,
        "n_val": len(val), "n_test": len(test) if test is not None else 0,
        "similarity": [[round(x, 4) for x in row] for row in sim],
        "threshold": spec.cluster.threshold,
        "clusters": cluster_info,
        "strategy": strategy.name,
        "merge_method": ev.merge_method,
        "entries": entries,
        "best_single": best["name"],
        "final": final_name,
        "final_beats_best_single_val": final["val_mean_loss"] < best["val_mean_loss"],
        "router_fit_losses": fit_history,
        "evaluations": ev.evaluations,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if test is not None:
        result["final_beats_best_single_test"] = final["test_mean_loss"] < best["test_mean_loss"]

    # 5. outputs, in a temporary folder renamed into place
    from mira.glue.report import write_reports

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        for ci, state in enumerate(merged_states):
            _save_model_state(ev, state, tmp / "clusters" / f"cluster_{ci}")
        atomic_torch_save(tmp / "router.pt", {**router.state_dict(), "experts": [f"clusters/cluster_{i}"
                                                                                  for i in range(len(clusters))],
                                              "kind": final_name})
        write_reports(result, tmp)
    log(f"wrote {out} in {result['seconds']:.1f} s")
    return result
