"""The SHED pipeline through the Python API: budgets, validation split, determinism, outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mira.config import DataConfig
from mira.data.records import Record, load_records
from mira.errors import MiraError
from mira.shed import ShedSettings, refine, write_outputs

from .conftest import TaskValue


def fake(**kw) -> ShedSettings:
    base = dict(embedder="hashing", clusters=12, iterations=3, group_size=1, tolerance=0.0, antithetic=False,
                center=False)
    if "budget_records" not in kw:
        base["budget_fraction"] = 0.25
    return ShedSettings(**{**base, **kw})


def run(records, **kw):
    return refine(records, fake(**kw), value_factory=lambda proxies, val: TaskValue(proxies))


def test_additive_values_are_recovered_per_cluster(records):
    res = run(records)
    proxies = [records[i] for i in res.proxy_indices()]
    np.testing.assert_allclose(res.values, [TaskValue.WORTH[r.task] for r in proxies])
    assert res.shapley.v_empty == 0.0


def test_qocs_prefers_the_valuable_clusters(records):
    res = run(records, strategy="qocs")
    order = np.argsort(-res.values, kind="stable")
    chosen = set(res.indices)
    cand = np.asarray(res.candidates)
    taken = [np.mean([int(p) in chosen for p in cand[res.clustering.members[c]]]) for c in order]
    # whole clusters in value order: a prefix fully taken, at most one partial, then nothing
    assert taken == sorted(taken, reverse=True)
    assert sum(0 < t < 1 for t in taken) <= 1


def test_budget_fraction_and_count_and_validation_holdout(records):
    res = run(records, budget_fraction=0.25, val_fraction=0.1)
    assert len(res.val_indices) == 12 and len(res.candidates) == 108
    assert len(res.indices) == res.budget_count == 27
    assert not set(res.indices) & set(res.val_indices)
    assert res.records == [records[i] for i in res.indices]
    assert len(run(records, budget_records=40).indices) == 40
    val = [Record("Add the two numbers.", "3", "1 + 2", "add")]
    res = refine(records, fake(budget_fraction=1.0), val_records=val, value_factory=lambda p, v: TaskValue(p))
    assert res.val_indices == [] and res.indices == list(range(len(records)))


@pytest.mark.parametrize("strategy", ["qocs", "qwcs"])
def test_same_seed_same_subset(records, strategy):
    a = run(records, strategy=strategy, seed=4)
    b = run(records, strategy=strategy, seed=4)
    c = run(records, strategy=strategy, seed=5)
    assert a.indices == b.indices and a.selection_order == b.selection_order
    assert a.indices != c.indices


def test_precomputed_embeddings_match(records):
    from mira.shed.embed import embed_records

    emb = embed_records(records, "hashing", fields="split")  # the settings' default
    a = refine(records, fake(), embeddings=emb, value_factory=lambda p, v: TaskValue(p))
    assert a.indices == run(records).indices
    with pytest.raises(MiraError, match="one row per record"):
        refine(records, fake(), embeddings=emb[:5], value_factory=lambda p, v: TaskValue(p))


def test_defaults_keep_a_first_run_small():
    """Ten groups per permutation whatever the size (not groups of one below 75 records), at least ten clusters."""
    s = ShedSettings()
    assert [s.group_count(k) for k in (5, 10, 11, 48, 455, 3000)] == [1, 1, 2, 5, 46, 300]
    assert [s.cluster_count(n) for n in (5, 50, 330, 15000)] == [5, 10, 10, 455]
    assert s.budget_count(200) == 20  # no budget given: 10 %
    assert (s.optimizer, s.value_lr, s.steps, s.antithetic, s.center) == ("sgd", 0.1, 10, True, True)
    assert ShedSettings(optimizer="adamw").value_lr == 3e-3


def test_split_embedding_separates_bad_responses():
    """``embed_fields="split"``: records that ask alike but answer "N/A" get clusters of their own."""
    from mira.shed.cluster import kmeans
    from mira.shed.embed import embed_records

    good = [Record(f"Describe the city number {i} in two sentences.", f"City {i} is large. It has a river and "
                   f"{i} bridges, many parks and an old harbour.") for i in range(12)]
    bad = [Record(f"Describe the city number {i} in two sentences.", "N/A") for i in range(12, 16)]
    recs = good + bad
    split = embed_records(recs, "hashing", fields="split")
    assert split.shape[1] == 2 * embed_records(recs, "hashing", fields="example").shape[1]
    np.testing.assert_allclose(np.linalg.norm(split, axis=1), 1.0, rtol=1e-5)
    labels = kmeans(split, 2, seed=0).labels
    assert len(set(labels[12:])) == 1 and labels[0] != labels[12] and len(set(labels[:12])) == 1
    with pytest.raises(MiraError, match="embed_fields"):
        embed_records(recs, "hashing", fields="both")


def test_api_errors(records):
    with pytest.raises(MiraError, match="empty"):
        run([])
    with pytest.raises(MiraError, match="record 1 .* no output"):
        run([records[0], Record("do it", "  "), records[2]])
    with pytest.raises(MiraError, match="larger than the 108 candidate"):
        run(records, budget_records=500)
    with pytest.raises(MiraError, match="more clusters"):
        run(records, clusters=109)
    with pytest.raises(MiraError, match="budget_fraction"):
        ShedSettings.from_mapping({"budget_fraction": 1.5})
    with pytest.raises(MiraError, match="refine.strategy"):
        ShedSettings.from_mapping({"strategy": "best"}, where="refine")


def test_write_outputs_round_trip(tmp_path, records):
    res = run(records, strategy="qwcs")
    paths = write_outputs(res, tmp_path / "out" / "refined.jsonl")
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    back = load_records(DataConfig(source="json", path=str(paths["refined"]), max_per_task=None))
    assert back == res.records
    rep = json.loads(paths["report"].read_text())
    assert rep["chosen"] == res.indices and rep["settings"]["strategy"] == "qwcs"
    assert sum(c["size"] for c in rep["clusters"]) == len(res.candidates)
    assert sum(c["selected"] for c in rep["clusters"]) == len(res.indices)
    assert {"embed_s", "cluster_s", "shapley_s", "select_s", "total_s"} <= set(rep["timings_s"])
    assert not [p for p in paths["refined"].parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_real_end_to_end_demo_model_and_minilm(records):
    """all-MiniLM-L6-v2 embeddings + LoRA on builtin:demo as v(S); deterministic with one proxy model."""
    from mira.shed.value import ProxyModel

    small = records[::3]  # 40 records, 4 tasks
    s = ShedSettings(embedder="all-MiniLM-L6-v2", budget_fraction=0.3, clusters=6, iterations=2, group_size=2, steps=3,
                     batch_size=4, max_val=6, max_length=80, seed=1, strategy="qocs")
    proxy = ProxyModel.load(s)
    a = refine(small, s, proxy=proxy)
    b = refine(small, s, proxy=proxy)
    assert a.indices == b.indices and np.array_equal(a.values, b.values)
    assert len(a.indices) == a.budget_count == round(0.3 * len(a.candidates))
    assert a.clustering.k == 6 and np.isfinite(a.values).all()
    assert a.shapley.v_empty < 0 and a.shapley.v_full != a.shapley.v_empty  # neg loss moves with training
    # the adapter is reset after the run: the slot holds the fresh initialisation again
    state = proxy.slot.get()
    assert all(torch_equal(state[k], proxy.slot.initial_state[k]) for k in state)
    # the MiniLM embeddings group the 4 tasks: most clusters are pure
    cand = np.asarray(a.candidates)
    purity = [max(np.unique([small[i].task for i in cand[m]], return_counts=True)[1]) / len(m)
              for m in a.clustering.members]
    assert np.mean(purity) > 0.8


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


class SeededTaskValue(TaskValue):
    """TaskValue whose training seed decides which proxy it never sees (as batch priorities can)."""

    def __init__(self, proxy_records):
        super().__init__(proxy_records)
        self.seeds: set[int] = set()

    def evaluate(self, coalition: frozenset, seed: int) -> float:
        self.seeds.add(seed)
        return float(sum(self.w[i] for i in coalition if i != seed % len(self.w)))

    def __call__(self, coalition: frozenset) -> float:
        return self.evaluate(coalition, 0)


def test_train_seeds_per_unit(records):
    made = []

    def factory(proxies, val):
        made.append(SeededTaskValue(proxies))
        return made[-1]

    fixed = refine(records, fake(iterations=6, noise_seeds=0), value_factory=factory)
    assert fixed.values[0] == 0.0 and made[-1].seeds == {0}  # seed 0 never sees proxy 0, in any permutation
    per = refine(records, fake(iterations=6, noise_seeds=0, train_seeds="per_unit"), value_factory=factory)
    assert made[-1].seeds == {0} | {1000 + u for u in range(6)}  # one training seed per unit (permutation)
    w = np.array(made[-1].w)
    missed = {(1000 + u) % len(w) for u in range(6)}  # each missed by one unit of six
    np.testing.assert_allclose(per.values, w * [5 / 6 if c in missed else 1.0 for c in range(len(w))])
    assert per.reliability.evaluations == per.shapley.evaluations > fixed.shapley.evaluations
    with pytest.raises(MiraError, match="train_seeds"):
        refine(records, fake(train_seeds="per_unit"), value_factory=lambda proxies, val: TaskValue(proxies))


def test_proxy_size_trains_v_on_several_members_per_cluster(records):
    """proxy_size 3: each cluster's three nearest members are its player's records; the rest may be background."""
    from mira.shed.value import ProxyModel

    s = ShedSettings(embedder="hashing", budget_fraction=0.25, clusters=6, iterations=2, group_size=2, steps=3,
                     batch_size=4, max_val=6, max_length=80, background=4, noise_seeds=0, seed=1)
    proxy = ProxyModel.load(s)
    logs: list[str] = []
    one = refine(records[::3], s, proxy=proxy)
    three = refine(records[::3], s.model_copy(update={"proxy_size": 3}), proxy=proxy, log=logs.append)
    again = refine(records[::3], s.model_copy(update={"proxy_size": 3}), proxy=proxy)
    assert np.array_equal(three.values, again.values)  # deterministic
    assert not np.array_equal(three.values, one.values)  # the members change what v(S) learns
    assert three.clustering.labels.tolist() == one.clustering.labels.tolist()  # same clusters, other players
    assert any("up to 3 members of each cluster" in m for m in logs)
    with pytest.raises(MiraError, match="proxy_size"):
        ShedSettings.from_mapping({"proxy_size": 0, "budget_fraction": 0.1})
