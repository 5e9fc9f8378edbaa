"""The experiment machinery: validation split, ``mira tune``, ``mira compare`` as an instrument
(up-front checks, partial results, resume, paired differences vs a baseline, readable plots),
the learned graph's AUC and the centered estimator, MIRA's per-round step check, and three
defects (repeated examples in a batch, NaN in the pooled update, FedProx's logged loss)."""
import copy
import json

import numpy as np
import pytest
import torch

import mira.federated.engine as engine_mod
from mira.cli import main
from mira.config import PartitionConfig, validate
from mira.data.partition import partition
from mira.data.records import load_records
from mira.errors import MiraError
from mira.federated.compare import compare, comparison_markdown, paired_vs_baseline, results
from mira.federated.engine import Engine, Workspace
from mira.federated.graph import build_graph, task_auc
from mira.federated.strategies import FitRes, StrategyContext, get_strategy
from mira.train.trainer import LocalTrainer, TrainSettings, batch_indices
from tests.conftest import write_yaml


def _raw(tiny_cfg, **changes):
    raw = copy.deepcopy(tiny_cfg)
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def _run(raw, out):
    cfg = validate(raw)
    eng = Engine(Workspace.load(cfg), cfg, out)
    return eng, eng.run()


# -- 6a. a batch never holds an example twice ----------------------------------------------------

def test_batches_never_repeat_an_example_and_stay_seeded():
    batches = batch_indices(100, 8, 1000, seed=0)
    assert len(batches) == 1000 and all(len(b) == 8 for b in batches)
    assert sum(len(b) - len(set(b)) for b in batches) == 0
    assert batches == batch_indices(100, 8, 1000, seed=0) and batches != batch_indices(100, 8, 1000, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:96]) == sorted(set(flat[:96]))  # the first permutation's examples, each once
    counts = np.bincount(flat, minlength=100)
    assert counts.max() - counts.min() <= 2  # every example used about equally often (80 times)
    assert all(sorted(b) == list(range(5)) for b in batch_indices(5, 8, 20, seed=3))  # batch >= n: all of them


# -- 1. validation split ----------------------------------------------------------------------------

def test_validation_split_is_carved_from_training_data_seeded_and_disjoint(tiny_cfg):
    cfg = validate(tiny_cfg)
    records = load_records(cfg.data, seed=0)
    plain = partition(records, cfg.partition, seed=0)
    with_val = partition(records, PartitionConfig(**{**cfg.partition.model_dump(), "val_fraction": 0.25}), seed=0)
    again = partition(records, PartitionConfig(**{**cfg.partition.model_dump(), "val_fraction": 0.25}), seed=0)
    ids = lambda rs: {id(r) for r in rs}  # noqa: E731  (the same record objects; the suite repeats some texts)
    for a, b, c in zip(plain, with_val, again):
        assert a.val == [] and len(b.val) == round(0.25 * len(a.train)) == 4
        assert b.test == a.test  # the test split does not depend on the validation split
        assert ids(b.train) | ids(b.val) == ids(a.train) and len(b.train) + len(b.val) == len(a.train)
        assert not ids(b.val) & (ids(b.train) | ids(b.test))
        assert (b.train, b.val) == (c.train, c.val)
    with pytest.raises(MiraError, match="val_fraction"):
        partition(records, PartitionConfig(name="by_task", test_size=6, val_fraction=0.99), seed=0, min_train=2)


def test_engine_reports_validation_loss_per_client_and_mean(tiny_cfg, tmp_path):
    eng, s = _run(_raw(tiny_cfg, partition__val_fraction=0.25, algorithm={"name": "local"}, federation__rounds=1),
                  tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all("val_loss" in r and r["n_val"] == 4 for r in rows)
    assert s["mean_val_loss"] == pytest.approx(np.mean([c["val_loss"] for c in s["clients"]]))
    # local: each client's own adapter on its own validation split
    from mira.eval.metrics import eval_loss

    eng.ws.slot.set(eng.strategy.adapter_for(2))
    own = eval_loss(eng.ws.model, eng.ws.val[2], eng.ws.tokenizer.pad_token_id, 16)[0]
    assert s["clients"][2]["val_loss"] == pytest.approx(own)
    assert s["clients"][2]["n_train"] == 18 - 4
    _, plain = _run(_raw(tiny_cfg, algorithm={"name": "local"}, federation__rounds=1), tmp_path / "plain")
    assert "mean_val_loss" not in plain and "val_loss" not in plain["clients"][0]


# -- 2. mira tune -----------------------------------------------------------------------------------

def test_tune_picks_the_lowest_validation_loss_and_ignores_test_losses(tiny_cfg, tmp_path, capsys, monkeypatch):
    cfg = str(write_yaml(tmp_path / "cfg.yaml", _raw(tiny_cfg, federation__rounds=1)))
    args = ["tune", cfg, "--algorithm", "local", "--grid", "federation.lr=[1e-4,3e-2]", "--seeds", "0", "-q"]
    assert main([*args, "--out", str(tmp_path / "t1")]) == 0
    printed = capsys.readouterr().out
    t1 = json.loads((tmp_path / "t1/tune.json").read_text())
    vals = [p["mean_val_loss"] for p in t1["points"]]
    assert t1["val_fraction"] == 0.2 and "val_fraction set to 0.2" in t1["notes"][0]
    assert t1["best"]["index"] == int(np.argmin(vals)) and t1["status"] == "finished"
    chosen = t1["points"][t1["best"]["index"]]["params"]["federation.lr"]
    assert f"--set federation.lr={chosen!r}" in printed and "val_fraction set to 0.2" in printed
    assert "(chosen)" in (tmp_path / "t1/tune.md").read_text()
    assert all("mean_local_test_loss" in p["test_not_used_for_selection"]["0"] for p in t1["points"])

    # test losses that would reverse the choice change nothing: selection looks at validation only
    def upside_down(self, ds):
        return (1000.0 if self.cfg.federation.lr == chosen else 0.0), 1

    monkeypatch.setattr(Engine, "test_loss", upside_down)
    assert main([*args, "--out", str(tmp_path / "t2")]) == 0
    t2 = json.loads((tmp_path / "t2/tune.json").read_text())
    assert t2["best"] == t1["best"] and [p["mean_val_loss"] for p in t2["points"]] == vals
    assert t2["points"][t2["best"]["index"]]["test_not_used_for_selection"]["0"]["mean_local_test_loss"] == 1000.0


def test_tune_validates_every_point_before_running(tiny_cfg, tmp_path, capsys):
    cfg = str(write_yaml(tmp_path / "cfg.yaml", tiny_cfg))
    out = tmp_path / "t"
    # eta*lambda*max row sum of the uniform graph (3 neighbours) = 0.1*5*3 >= 1 for the second point
    assert main(["tune", cfg, "-a", "mira:graph=uniform,eta=0.1", "--grid", "algorithm.lambda=[0.5,5]", "--out", str(out),
                 "-q"]) == 2
    assert "overshoot" in capsys.readouterr().err and not out.exists()
    assert main(["tune", cfg, "-a", "fedit", "--grid", "algorithm.lambda=[1]", "--out", str(out), "-q"]) == 2
    assert "unknown option" in capsys.readouterr().err and not out.exists()


# -- 3. mira compare as an instrument ------------------------------------------------------------------

def test_compare_checks_every_setup_before_the_first_run(tiny_cfg, tmp_path, capsys):
    cfg = str(write_yaml(tmp_path / "cfg.yaml", tiny_cfg))
    out = tmp_path / "cmp"
    assert main(["compare", cfg, "-a", "local,mira:graph=uniform,eta=1", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "overshoot" in err and "mira(graph=uniform,eta=1) (seed 0)" in err and not out.exists()
    assert main(["compare", cfg, "-a", "local,mira", "--baseline", "fedit", "--out", str(out), "-q"]) == 2
    assert "baseline 'fedit' is not among" in capsys.readouterr().err and not out.exists()


def test_compare_writes_partial_results_and_resumes(tiny_cfg, tmp_path, monkeypatch):
    raw = _raw(tiny_cfg, federation__rounds=2)
    cfg = validate(raw)
    out = tmp_path / "cmp"
    real = Engine.run_round

    def dies(self, rnd, progress):
        if self.cfg.algorithm.name == "fedit" and rnd == 2:
            raise KeyboardInterrupt  # as if killed during fedit's second round
        return real(self, rnd, progress)

    monkeypatch.setattr(Engine, "run_round", dies)
    with pytest.raises(KeyboardInterrupt):
        compare(cfg, ["local", "fedit", "mira"], out, seeds=[0])
    monkeypatch.setattr(Engine, "run_round", real)
    state = json.loads((out / "comparison.json").read_text())
    assert state["status"] == "running" and state["finished_runs"] == 1 and list(state["algorithms"]) == ["local"]
    assert "Partial: 1 of 3 runs finished" in (out / "comparison.md").read_text()
    assert (out / "fedit/checkpoint.pt").exists() and not (out / "fedit/summary.json").exists()
    local_summary = (out / "local/summary.json").read_bytes()

    ran = []
    real_run = Engine.run

    def spy(self, resume=False, progress=None):
        ran.append((self.cfg.algorithm.name, resume, self.out.name))
        return real_run(self, resume=resume, progress=progress)

    monkeypatch.setattr(Engine, "run", spy)
    assert main(["compare", "--resume", str(out), "-q"]) == 0
    assert ran == [("fedit", True, "fedit"), ("mira", True, "mira")]  # local was finished: not redone
    assert (out / "local/summary.json").read_bytes() == local_summary
    done = json.loads((out / "comparison.json").read_text())
    assert done["status"] == "finished" and set(done["algorithms"]) == {"local", "fedit", "mira"}
    assert done["paired"]["baseline"] == "fedit" and set(done["paired"]["algorithms"]) == {"local", "mira"}
    # the resumed fedit run is the uninterrupted one
    _, ref = _run({**raw, "algorithm": {"name": "fedit"}}, tmp_path / "ref")
    assert json.loads((out / "fedit/summary.json").read_text())["clients"] == ref["clients"]
    assert main(["compare", "--resume", str(out), "--seeds", "1", "-q"]) == 2


def _summary(local, glob, clients):
    return {"mean_local_test_loss": local, "mean_global_test_loss": glob, "bytes_up": 0, "bytes_down": 0,
            "clients": [{"id": i, "local_test_loss": v} for i, v in enumerate(clients)]}


def test_paired_differences_and_per_client_wins_vs_the_baseline():
    seeds = [0, 1, 2]
    per_seed = {"fedit": {s: _summary(3.0 + s, 3.0, [3.0, 3.0, 3.0]) for s in seeds},
                "mira": {s: _summary(2.9 + s + 0.01 * s, 3.1, [2.9, 3.0005, 3.2]) for s in seeds}}
    paired = paired_vs_baseline(per_seed, ["fedit", "mira"], seeds, "fedit")["algorithms"]["mira"]
    diffs = [-0.1, -0.09, -0.08]
    assert paired["local"]["mean"] == pytest.approx(np.mean(diffs))
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert paired["local"]["ci95"] == pytest.approx(half) and paired["global"]["mean"] == pytest.approx(0.1)
    assert paired["clients"] == {"wins": 3, "ties": 3, "losses": 3}  # |3.0005 - 3.0| < 1e-3 is a tie
    res = results({"specs": ["fedit", "mira"]}, ["fedit", "mira"], seeds, per_seed, {}, "fedit", 6, "finished")
    md = comparison_markdown(res)
    assert "## Paired differences vs fedit" in md and "tie: |difference| < 0.001" in md
    assert "| mira | 3 | -0.0900 ± " in md and "| 3 / 3 / 3 |" in md


def test_comparison_png_labels_do_not_overlap_with_many_algorithms():
    from mira.report.plots import comparison_figure

    algos = ["local", "fedit", "fedprox", "ffa_lora", "centralized", "mira", "mira(graph=similarity)",
             "mira(graph=similarity,similarity=centered)", "fedadam", "fedyogi"]
    fig = comparison_figure(algos, list(np.linspace(2.8, 2.9, 10)), list(np.linspace(3.0, 2.8, 10)))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert [t.get_text().replace("\n", "") for t in ax.get_yticklabels()] == algos  # long ones wrapped
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    fig_box = fig.bbox
    assert all(b.x0 >= fig_box.x0 - 1 and b.x1 <= fig_box.x1 + 1 for b in boxes)  # not cut off


def test_comparison_png_with_the_real_long_labels_keeps_every_text_inside_and_the_plot_readable():
    """The labels `mira compare` writes (130 characters for MIRA with the profile graph) are wrapped after
    commas: every text stays inside the figure, no two labels overlap, and the bars keep most of the width."""
    from mira.report.plots import comparison_figure, wrap_label

    prof = ("mira(graph=similarity,similarity=profile,similarity_average=True,eta=0.1,estimator_diagnostics=True,"
            "federation.lr=0.006,lambda=4)")
    algos = ["fedit(federation.lr=0.012)", "local(federation.lr=0.003)", "mira(eta=0.1,federation.lr=0.012,lambda=0.5)",
             prof, prof.replace("similarity=profile,", ""), "fedprox(mu=0.01,federation.lr=0.012)",
             "ffa_lora(federation.lr=0.024)", "centralized(federation.lr=0.006)", "fedadam(federation.lr=0.001)"]
    assert wrap_label(prof).replace("\n", "") == prof and max(map(len, wrap_label(prof).split("\n"))) <= 38
    fig = comparison_figure(algos, list(np.linspace(2.8, 2.9, 9)), list(np.linspace(3.0, 2.8, 9)))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [ax.title, ax.xaxis.label, *ax.get_legend().get_texts(), *ax.get_yticklabels()]
    for t in texts:
        b, f = t.get_window_extent(renderer), fig.bbox
        assert f.x0 - 1 <= b.x0 and b.x1 <= f.x1 + 1 and f.y0 - 1 <= b.y0 and b.y1 <= f.y1 + 1, t.get_text()[:40]
    ticks = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert not any(a.overlaps(b) for i, a in enumerate(ticks) for b in ticks[i + 1:])
    assert ax.get_window_extent(renderer).width >= 0.6 * fig.bbox.width  # the bars, not the labels, fill it


# -- 4. the learned graph -----------------------------------------------------------------------------

def test_graph_auc_per_round_and_step_scaling_in_a_run(tiny_cfg, tmp_path):
    raw = _raw(tiny_cfg, partition__clients_per_task=2, plots=True, data__tasks=["add", "upper"],
               algorithm={"name": "mira", "graph": "similarity", "lambda": 200.0})
    _, s = _run(raw, tmp_path / "run")
    rounds = json.loads((tmp_path / "run/rounds.json").read_text())
    assert all(0 <= e["graph_auc"] <= 1 for e in rounds)
    assert s["graph_auc_last"] == rounds[-1]["graph_auc"]
    assert (tmp_path / "run/plots/graph_auc.png").exists()
    # eta*lambda = 0.02*200 = 4: the learned graph's row sums (about 0.5-0.9 here) would overshoot,
    # so each round's step is scaled down to 0.9/max row sum
    assert all(e["step_configured"] == pytest.approx(4.0) for e in rounds)
    for e in rounds:
        assert e["step_scaled"] == (e["step_configured"] * e["max_row_sum"] >= 1)
        if e["step_scaled"]:
            assert e["step"] == pytest.approx(0.9 / e["max_row_sum"])
    assert s["step_scaled_rounds"] == [e["round"] for e in rounds if e["step_scaled"]] != []


def test_task_auc():
    tasks = ["a", "a", "b", "b"]
    perfect = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=float)
    assert task_auc(perfect, tasks) == 1.0 and task_auc(1 - perfect - np.eye(4), tasks) == 0.0
    assert task_auc(np.ones((4, 4)), tasks) == 0.5
    assert task_auc(perfect, ["a", "b", "c", "d"]) is None  # no pair shares a task


def _simulate(graph, rounds=8, seed=0, d=100, per_round=3):
    """3 tasks x 2 clients; each update = a shared direction + the task's direction + noise + a direction
    common to the clients of that round only (training drift under partial participation)."""
    rng = np.random.default_rng(seed)
    tasks = np.repeat(np.arange(3), 2)
    t_dir = rng.normal(size=(3, d)) / np.sqrt(d)
    shared = rng.normal(size=d) / np.sqrt(d)
    for _ in range(rounds):
        sampled = sorted(rng.choice(6, per_round, replace=False))
        drift = 2.0 * rng.normal(size=d) / np.sqrt(d)
        graph.update({int(k): torch.tensor(2 * shared + drift + t_dir[tasks[k]] + 0.5 * rng.normal(size=d) / np.sqrt(d))
                      for k in sampled})
    return task_auc(graph.a, [str(t) for t in tasks]) if len(graph.last_update) == 6 else None


def test_centered_similarity_separates_tasks_where_raw_cosine_does_not():
    raw, centered, averaged = [], [], []
    for seed in range(10):
        raw.append(_simulate(build_graph("similarity", 6, 0), seed=seed))
        centered.append(_simulate(build_graph("similarity", 6, 0, similarity="centered"), seed=seed))
        averaged.append(_simulate(build_graph("similarity", 6, 0, similarity="centered", similarity_average=True),
                                  seed=seed))
    ok = [i for i, v in enumerate(raw) if v is not None]  # every client sampled at least once
    assert len(ok) >= 8
    raw, centered, averaged = (np.mean([x[i] for i in ok]) for x in (raw, centered, averaged))
    assert averaged >= 0.9 and centered >= 0.9
    assert raw < centered - 0.1 and raw < 0.85
    # the estimator's state survives a checkpoint
    g = build_graph("similarity", 6, 0, similarity="centered", similarity_average=True)
    _simulate(g, rounds=3)
    h = build_graph("similarity", 6, 0, similarity="centered", similarity_average=True)
    h.load_state_dict(engine_mod.from_checkpoint(engine_mod.to_checkpoint(g.state_dict())))
    upd = {0: torch.ones(100, dtype=torch.float64), 3: -torch.ones(100, dtype=torch.float64)}
    np.testing.assert_array_equal(g.update(dict(upd)), h.update(dict(upd)))


def _simulate_shared(graph, seed, rounds=30, k=20, d=400):
    """Dolly-like updates: every client learns the same shared direction (the prompt format), its
    task's direction (two of the five tasks overlap), a persistent direction of its own (its
    data) and noise; 5 of 20 clients a round. Returns the task AUC of the last graph."""
    rng = np.random.default_rng(seed)
    tasks = np.repeat(np.arange(5), 4)
    t_dir = rng.normal(size=(5, d)) / np.sqrt(d)
    t_dir[4] = 0.6 * t_dir[3] + 0.8 * t_dir[4]
    shared = rng.normal(size=d) / np.sqrt(d)
    own = rng.normal(size=(k, d)) / np.sqrt(d)
    for _ in range(rounds):
        sampled = sorted(rng.choice(k, 5, replace=False))
        graph.update({int(c): torch.tensor(2 * shared + 0.4 * t_dir[tasks[c]] + 0.5 * own[c]
                                           + 1.5 * rng.normal(size=d) / np.sqrt(d)) for c in sampled})
    return task_auc(graph.a, [str(t) for t in tasks]) if len(graph.last_update) == k else None


def test_profile_similarity_is_the_correlation_over_the_other_clients():
    from mira.federated.graph import profile_similarity

    rng = np.random.default_rng(0)
    c = rng.normal(size=(6, 6))
    c = (c + c.T) / 2
    np.fill_diagonal(c, 0)
    a = profile_similarity(c)
    assert np.allclose(a, a.T) and (np.diag(a) == 0).all() and (a >= 0).all()
    for k in range(6):
        for j in range(6):
            if k != j:
                keep = [i for i in range(6) if i not in (k, j)]
                r = np.corrcoef(c[k, keep], c[j, keep])[0, 1]
                assert a[k, j] == pytest.approx(max(r, 0.0), abs=1e-12)
    assert (profile_similarity(np.zeros((3, 3))) == 0).all()  # constant rows: no edge, no NaN
    assert (profile_similarity(c[:2, :2]) == 0).all()  # two clients: nothing else to compare on


def test_profile_similarity_separates_tasks_where_cosine_of_the_averages_does_not():
    """With a strong shared direction, persistent per-client directions and noise (as the Dolly
    runs show, docs/mira.md), the profile of centred similarities recovers the tasks far better
    than the cosine of the averaged updates; the graph stays a valid one (symmetric, >= 0)."""
    cos, prof = [], []
    for seed in range(10):
        cos.append(_simulate_shared(build_graph("similarity", 20, 0, similarity_average=True), seed))
        g = build_graph("similarity", 20, 0, similarity="profile", similarity_average=True)
        prof.append(_simulate_shared(g, seed))
        assert np.allclose(g.a, g.a.T) and (g.a >= 0).all() and (np.diag(g.a) == 0).all()
    assert None not in cos + prof
    assert np.mean(prof) >= 0.95 and np.mean(cos) <= np.mean(prof) - 0.08, (np.mean(cos), np.mean(prof))


def test_similarity_options_only_with_the_similarity_graph():
    cls = get_strategy("mira")
    with pytest.raises(MiraError, match="similarity"):
        cls(cls.parse_params({"graph": "uniform", "similarity": "centered"}), _ctx(), _state(0))
    with pytest.raises(MiraError, match="similarity"):
        cls.parse_params({"similarity": "pearson"})


# -- 5. MIRA's step against the graph actually used ------------------------------------------------------

KEYS = ["m.0.q.lora_A.weight", "m.0.q.lora_B.weight"]


def _ctx(k=4):
    return StrategyContext(num_clients=k, n_train=[10] * k, lr=0.01, local_steps=5, seed=0, keys=KEYS)


def _state(v):
    return {KEYS[0]: torch.full((2, 3), float(v)), KEYS[1]: torch.full((3, 2), float(v) * 2)}


def test_similarity_graph_step_is_scaled_to_that_rounds_graph():
    cls = get_strategy("mira")
    # the old bound eta*lambda*(K-1) = 0.1*8*3 >= 1 refused this; the real row sums decide now
    s = cls(cls.parse_params({"graph": "similarity", "eta": 0.1, "lambda": 8}), _ctx(), _state(0))
    fresh = {0: _state(1), 1: _state(1.1), 2: _state(1.2), 3: _state(-1)}
    info = s.aggregate_fit(1, {k: FitRes(v, 10) for k, v in fresh.items()})
    a = s.graphs[-1]
    d = a.sum(axis=1).max()
    assert d > 1.9 and info["step_scaled"] and info["step"] == pytest.approx(0.9 / d)
    assert info["step_configured"] == pytest.approx(0.8) and info["max_row_sum"] == pytest.approx(d)
    for k in range(4):  # the formula with the scaled step; no client's own weight is negative
        lap = sum(a[k, l] * (fresh[k][KEYS[0]] - fresh[l][KEYS[0]]) for l in range(4) if l != k)
        assert torch.allclose(s.adapter_for(k)[KEYS[0]], fresh[k][KEYS[0]] - 0.9 / d * lap)
        assert 1 - info["step"] * a[k].sum() >= 0.1 - 1e-9
    small = cls(cls.parse_params({"graph": "similarity", "eta": 0.01, "lambda": 1}), _ctx(), _state(0))
    assert small.aggregate_fit(1, {k: FitRes(v, 10) for k, v in fresh.items()})["step_scaled"] is False
    with pytest.raises(MiraError, match="overshoot"):  # a static graph is still checked at configuration time
        cls(cls.parse_params({"graph": "uniform", "eta": 0.1, "lambda": 8}), _ctx(), _state(0))


# -- 6b. NaN/Inf in the pooled (centralized) update ---------------------------------------------------------

def test_a_nan_pooled_update_is_rejected(tiny_cfg, tmp_path, monkeypatch, caplog):
    real = engine_mod.client_fit

    def poisoned(slot, trainer, ds, ins, seed, steps=None):
        adapter, res = real(slot, trainer, ds, ins, seed, steps)
        return {k: torch.full_like(v, float("inf")) for k, v in adapter.items()}, res

    monkeypatch.setattr(engine_mod, "client_fit", poisoned)
    # the round's only update is rejected: the run stops (issue 15, see test_run_stops.py), nothing aggregated
    with pytest.raises(engine_mod.RunStopped, match=r"round 1: every update had NaN/Inf values \(the pooled update\)"):
        _run(_raw(tiny_cfg, algorithm={"name": "centralized"}, federation__rounds=1), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and "NaN/Inf" in caplog.text


# -- 6c. FedProx logs the task loss, and the proximal term apart --------------------------------------------

def test_fedprox_train_loss_is_the_task_loss_and_the_prox_term_is_apart(tiny_cfg, tmp_path):
    cfg = validate(tiny_cfg)
    ws = Workspace.load(cfg)
    trainer = LocalTrainer(ws.slot, ws.tokenizer.pad_token_id, TrainSettings(lr=0.01, batch_size=4, steps=1))
    start = ws.slot.initial_state
    anchor = {k: v + 0.1 for k, v in start.items()}
    ws.slot.set(start)
    plain = trainer.train(ws.train[0], seed=5)
    ws.slot.set(start)
    prox = trainer.train(ws.train[0], seed=5, prox_mu=100.0, anchor=anchor)
    expected = 100.0 / 2 * sum(float(((start[k] - anchor[k]) ** 2).sum()) for k in start)
    assert prox.loss == pytest.approx(plain.loss, abs=1e-6)  # one step: the same batch, the same task loss
    assert prox.prox_term == pytest.approx(expected, rel=1e-4) and prox.prox_term > 10 * prox.loss
    assert plain.prox_term == 0.0
    _run(_raw(tiny_cfg, algorithm={"name": "fedprox", "mu": 1000.0}, federation__rounds=1), tmp_path / "run")
    (entry,) = json.loads((tmp_path / "run/rounds.json").read_text())
    assert set(entry["train_loss"]) == set(entry["prox_term"]) == {"0", "1", "2", "3"}
    assert all(v > 0 for v in entry["prox_term"].values()) and all(v < 20 for v in entry["train_loss"].values())


# -- eval.global_loss: the K x all-test-sets evaluation only where it is wanted -----------------

def test_global_loss_final_and_never(tiny_cfg, tmp_path, monkeypatch):
    raw = _raw(tiny_cfg, federation__rounds=3, eval__every=1)
    _, every = _run(raw, tmp_path / "every")
    _, final = _run(_raw(raw, eval__global_loss="final", eval__generation="final", eval__max_new_tokens=4,
                         eval__max_examples=2), tmp_path / "final")
    rows = [json.loads(x) for x in (tmp_path / "final" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["global_loss"] is None and "rouge_l" not in r for r in rows if r["round"] < 3)
    assert all(r["global_loss"] is not None and 0 <= r["rouge_l"] <= 1 for r in rows if r["round"] == 3)
    assert 0 <= final["mean_rouge_l"] <= 1
    # the same training: "final" changes only what is evaluated, not the result
    assert final["mean_global_test_loss"] == pytest.approx(every["mean_global_test_loss"], abs=1e-6)
    assert final["mean_local_test_loss"] == pytest.approx(every["mean_local_test_loss"], abs=1e-6)

    calls = []
    real = Engine.test_loss
    monkeypatch.setattr(Engine, "test_loss", lambda self, ds: calls.append(ds is self.ws.global_test) or real(self, ds))
    cfg = write_yaml(tmp_path / "never.yaml", _raw(raw, eval__global_loss="never", plots=True))
    out = tmp_path / "cmp"
    assert main(["compare", str(cfg), "-a", "fedit,mira", "--out", str(out), "-q"]) == 0
    assert calls and not any(calls)  # the union of the test sets was never evaluated
    res = json.loads((out / "comparison.json").read_text())
    assert all("mean_global_test_loss" not in e for e in res["algorithms"].values())
    assert "global" not in res["paired"]["algorithms"]["mira"] and "local" in res["paired"]["algorithms"]["mira"]
    assert (out / "comparison.png").exists() and "| mira | 1 |" in (out / "comparison.md").read_text()


def test_estimator_diagnostics_measure_every_estimator_without_changing_the_run(tiny_cfg, tmp_path):
    base = dict(partition__clients_per_task=2, data__tasks=["add", "upper"], federation__fraction=0.5,
                federation__rounds=4)
    algo = {"name": "mira", "graph": "similarity", "similarity": "centered", "similarity_average": True}
    _, plain = _run(_raw(tiny_cfg, **base, algorithm=algo), tmp_path / "plain")
    _, diag = _run(_raw(tiny_cfg, **base, algorithm={**algo, "estimator_diagnostics": True}), tmp_path / "diag")
    assert diag["mean_local_test_loss"] == plain["mean_local_test_loss"]  # measurement only
    rounds = json.loads((tmp_path / "diag/rounds.json").read_text())
    for e in rounds:
        est = e["graph_auc_estimators"]
        assert set(est) == {"cosine", "cosine+average", "centered", "centered+average", "profile", "profile+average"}
        if est["centered+average"] is not None:  # the shadow of the estimator in use sees the same updates
            assert est["centered+average"] == pytest.approx(e["graph_auc"], abs=1e-12)
    assert diag["graph_auc_estimators_last"] == rounds[-1]["graph_auc_estimators"]
    with pytest.raises(MiraError, match="estimator_diagnostics applies to graph: similarity"):
        _run(_raw(tiny_cfg, **base, algorithm={"name": "mira", "estimator_diagnostics": True}), tmp_path / "bad")


def test_a_spec_carries_its_own_tuned_learning_rate(tiny_cfg):
    from mira.federated.compare import config_for, parse_spec

    cfg = validate(_raw(tiny_cfg))
    label, name, opts = parse_spec("mira:federation.lr=0.05,lambda=2")
    assert label == "mira(federation.lr=0.05,lambda=2)"
    run = config_for(cfg, name, opts, seed=1)
    assert run.federation.lr == 0.05 and run.algorithm.params()["lambda"] == 2
    assert config_for(cfg, *parse_spec("fedit")[1:], seed=1).federation.lr == cfg.federation.lr
    with pytest.raises(MiraError, match="federation.rounds cannot differ"):
        parse_spec("fedit:federation.rounds=3")


def test_each_compare_seed_draws_its_own_data_sample(tiny_cfg):
    """`mira compare --seeds 0,1` changes data.seed with the seed, so the clients' records differ between
    seeds (the spread over seeds covers the data sample); vary_data=False keeps them."""
    from mira.data.partition import partition
    from mira.data.records import load_records
    from mira.federated.compare import config_for

    cfg = validate(_raw(tiny_cfg))

    def sample(run):  # every record any client holds (train, validation, test), whatever the split
        clients = partition(load_records(run.data, seed=run.data.seed), run.partition, seed=run.seed, min_train=1)
        return sorted((r.instruction, r.input, r.output) for c in clients for r in c.train + c.val + c.test)

    a, b = (config_for(cfg, "fedit", {}, seed=s) for s in (0, 1))
    assert (a.data.seed, b.data.seed) == (cfg.data.seed, cfg.data.seed + 1) and (a.seed, b.seed) == (0, 1)
    assert sample(a) != sample(b)  # other records, not only another split of the same ones
    fixed = [config_for(cfg, "fedit", {}, seed=s, vary_data=False) for s in (0, 1)]
    assert fixed[0].data.seed == fixed[1].data.seed == cfg.data.seed
    assert sample(fixed[0]) == sample(fixed[1])
    assert sample(config_for(cfg, "fedit", {}, seed=1)) == sample(b)  # and it is seeded
