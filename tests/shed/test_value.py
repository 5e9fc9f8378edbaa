"""The LoRA value function v(S) on a real small model (builtin:demo), and one run on the real assets."""
from __future__ import annotations

import pytest
import torch

from mira.shed import ShedSettings
from mira.shed.value import LoraValue, ProxyModel


@pytest.fixture(scope="module")
def demo_proxy() -> ProxyModel:
    return ProxyModel.load(ShedSettings(model="builtin:demo", seed=0))


def test_value_is_a_deterministic_function_of_the_set(demo_proxy, records):
    s = ShedSettings(steps=3, batch_size=4, max_length=80, lr=1e-2)
    v = LoraValue(demo_proxy, records[:6], records[-8:], s)
    empty = v(frozenset())
    a = v(frozenset({0, 3, 5}))
    v(frozenset({1}))  # something else in between
    assert v(frozenset({5, 0, 3})) == a
    assert v(frozenset()) == empty and a != empty
    assert empty == pytest.approx(v.score())  # v(empty): the slot was reset to the start adapter


def test_fixed_steps_whatever_the_coalition_size_and_paired_batches(demo_proxy, records):
    """Every v(S) trains ``steps`` steps; batches come from fixed priorities, so adding a player changes only
    the batches it enters (common random numbers across coalitions)."""
    s = ShedSettings(steps=6, batch_size=4, max_length=80)
    v = LoraValue(demo_proxy, records[:12], records[-4:], s)
    small, big = v.batches(frozenset({0, 1, 2}), seed=0), v.batches(frozenset(range(12)), seed=0)
    assert len(small) == len(big) == 6  # the same budget for 3 players and for 12
    assert all(sorted(b) == [0, 1, 2] for b in small)  # fewer players than a batch: all of them each step
    assert all(len(b) == 4 for b in big)
    plus = v.batches(frozenset(range(12)) - {5}, seed=0)
    changed = [i for i, (x, y) in enumerate(zip(big, plus)) if x != y]
    assert changed == [i for i, b in enumerate(big) if v.row_of[5] in b]  # only where player 5 was drawn
    assert v.batches(frozenset(range(12)), seed=1) != big  # another training seed, other batches
    assert v.batches(frozenset(), seed=0) == []


def test_evaluate_with_other_seeds_measures_the_noise(demo_proxy, records):
    s = ShedSettings(steps=3, batch_size=2, max_length=80, lr=1e-2)
    v = LoraValue(demo_proxy, records[:8], records[-8:], s)
    everyone = frozenset(range(8))
    a = v(everyone)
    assert v.evaluate(everyone, seed=s.seed) == a  # __call__ is the settings' seed
    others = {v.evaluate(everyone, seed=k) for k in (1, 2)}
    assert len(others | {a}) == 3  # other batches, other values: the noise of one v(S)
    assert v.train_seconds > 0


def test_background_records_are_in_every_coalition(demo_proxy, records):
    s = ShedSettings(steps=3, batch_size=4, max_length=80, lr=0.05)
    plain = LoraValue(demo_proxy, records[:6], records[-8:], s)
    with_bg = LoraValue(demo_proxy, records[:6], records[-8:], s, background_records=records[30:34])
    assert with_bg.background == frozenset(range(6, 10))
    assert plain.batches(frozenset(), 0) == [] and len(with_bg.batches(frozenset(), 0)) == 3
    assert all(set(b) <= {with_bg.row_of[u] for u in with_bg.background} for b in with_bg.batches(frozenset(), 0))
    assert with_bg(frozenset()) != plain(frozenset())  # v(empty) already trains on the background
    assert plain(frozenset()) == pytest.approx(plain.score())


def test_sgd_and_adamw_differ(demo_proxy, records):
    s = ShedSettings(steps=3, batch_size=4, max_length=80)
    sgd = LoraValue(demo_proxy, records[:6], records[-8:], s)
    adam = LoraValue(demo_proxy, records[:6], records[-8:], s.model_copy(update={"optimizer": "adamw"}))
    everyone = frozenset(range(6))
    assert sgd(everyone) != adam(everyone)


def test_epochs_is_refused_with_a_reason():
    from mira.errors import MiraError

    with pytest.raises(MiraError, match="epochs.*removed.*fixed 'steps'"):
        ShedSettings.from_mapping({"epochs": 1.0})


def test_token_accuracy_and_warm_start(demo_proxy, records):
    s = ShedSettings(steps=2, batch_size=4, max_length=80, metric="token_accuracy", warm_start_steps=4, lr=1e-2)
    cold = LoraValue(demo_proxy, records[:4], records[-8:], s.model_copy(update={"warm_start_steps": 0}))
    warm = LoraValue(demo_proxy, records[:4], records[-8:], s, warm_records=records[10:40])
    for v in (cold, warm):
        assert 0.0 <= v(frozenset()) <= 1.0 and 0.0 <= v(frozenset({0, 1})) <= 1.0
    assert not all(bool((warm.start[k] == demo_proxy.slot.initial_state[k]).all()) for k in warm.start)
    # the game starts from the warm adapter: v(empty) moves (checked on the continuous loss; token
    # accuracy on 8 records is too coarse to be sure to change after 4 warm-up steps)
    s_loss = s.model_copy(update={"metric": "neg_loss"})
    cold_loss = LoraValue(demo_proxy, records[:4], records[-8:], s_loss.model_copy(update={"warm_start_steps": 0}))
    warm_loss = LoraValue(demo_proxy, records[:4], records[-8:], s_loss, warm_records=records[10:40])
    assert warm_loss(frozenset()) != cold_loss(frozenset())


def test_the_warm_start_does_not_take_the_sgd_rate(demo_proxy, records):
    """The warm start is AdamW: with SGD v(S) it runs at AdamW's default whatever the SGD rate (AdamW at an SGD
    rate such as 0.1 would move every weight by ~0.1 per step), and with AdamW v(S) at ``lr``."""
    def warm(**kw):
        s = ShedSettings(steps=2, batch_size=4, max_length=80, warm_start_steps=3, **kw)
        return LoraValue(demo_proxy, records[:4], records[-8:], s, warm_records=records[10:40]).start

    a, b = warm(lr=0.1), warm(lr=0.5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = warm(optimizer="adamw", lr=1e-3), warm(optimizer="adamw", lr=3e-2)
    assert not all(torch.equal(c[k], d[k]) for k in c)
    assert ShedSettings(lr=0.1).warm_lr == 3e-3 and ShedSettings(optimizer="adamw", lr=1e-3).warm_lr == 1e-3


@pytest.mark.assets
def test_dolly_with_stories260k(assets):
    """A tiny real refinement: 60 Dolly records, stories260K as the proxy model."""
    from mira.config import DataConfig
    from mira.data.records import load_records
    from mira.shed import refine

    dolly = assets / "data/dolly-15k/databricks-dolly-15k.jsonl"
    model = assets / "models/stories260K"
    if not dolly.exists() or not model.exists():
        pytest.skip("Dolly-15k or stories260K missing under MIRA_ASSETS")
    recs = load_records(DataConfig(source="dolly", path=str(dolly), max_per_task=8), seed=0)
    s = ShedSettings(model=str(model), embedder="hashing", budget_fraction=0.2, clusters=6, iterations=2, steps=3,
                     batch_size=4, max_length=160, template="compact", max_val=8, strategy="qwcs")
    res = refine(recs, s)
    assert len(res.records) == round(0.2 * len(res.candidates))
    assert res.shapley.v_full != res.shapley.v_empty


def test_record_weighting_gives_every_record_the_same_weight(demo_proxy, records):
    """``loss_weighting: record``: the training loss is the mean of each record's own mean token loss."""
    import torch

    from mira.data.prompts import collate, tokenize_records
    from mira.shed.value import record_mean_loss

    ds = tokenize_records(records[:4], demo_proxy.tokenizer, 80, "compact", "truncate_input")
    model = demo_proxy.model
    with torch.no_grad():
        one = [float(model(**collate(ds, [i], demo_proxy.pad_id)).loss) for i in range(len(ds))]
        batch = collate(ds, list(range(len(ds))), demo_proxy.pad_id)
        assert float(record_mean_loss(model, batch)) == pytest.approx(sum(one) / len(one), rel=1e-5)
        assert float(record_mean_loss(model, collate(ds, [2], demo_proxy.pad_id))) == pytest.approx(one[2], rel=1e-5)
    s = ShedSettings(steps=3, batch_size=4, max_length=80, lr=0.05)
    token = LoraValue(demo_proxy, records[:6], records[-8:], s)
    record = LoraValue(demo_proxy, records[:6], records[-8:], s.model_copy(update={"loss_weighting": "record"}))
    everyone = frozenset(range(6))
    assert ShedSettings().loss_weighting == "token"  # the default is unchanged
    assert record(everyone) != token(everyone) and record(frozenset()) == token(frozenset())


def test_a_player_of_several_records_trains_on_all_of_them(demo_proxy, records):
    """proxy_size > 1: each player brings several records; with one record per player nothing changes."""
    s = ShedSettings(steps=4, batch_size=4, max_length=80, lr=0.05)
    single = LoraValue(demo_proxy, records[:6], records[-8:], s, background_records=records[30:32])
    listed = LoraValue(demo_proxy, [[r] for r in records[:6]], records[-8:], s, background_records=records[30:32])
    for c in (frozenset(), frozenset({1, 4}), frozenset(range(6))):
        assert listed.batches(c, 0) == single.batches(c, 0)
    assert listed(frozenset({1, 4})) == single(frozenset({1, 4}))
    groups = [records[3 * p:3 * p + 3] for p in range(4)]  # 4 players of 3 records each
    multi = LoraValue(demo_proxy, groups, records[-8:], s)
    assert multi.n_players == 4 and multi.n_units == 12
    assert [u.tolist() for u in multi.units_of] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    rows = {r for b in multi.batches(frozenset({2}), 0) for r in b}
    assert rows == {multi.row_of[u] for u in (6, 7, 8)}  # player 2 alone: its three records, nothing else
    assert all(len(b) == 4 for b in multi.batches(frozenset({0, 2}), 0))  # 6 records, batches of 4
    proxies_only = LoraValue(demo_proxy, [g[0] for g in groups], records[-8:], s)
    assert multi(frozenset({0, 1})) != proxies_only(frozenset({0, 1}))  # the members train too
    with pytest.raises(Exception, match="at least one record"):
        LoraValue(demo_proxy, [[records[0]], []], records[-8:], s)
