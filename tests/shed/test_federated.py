"""The ``refine:`` section of a run config: each client refines its own train data, then training runs."""
from __future__ import annotations

import json

import pytest

from mira.config import load_config
from mira.errors import MiraError

OVERRIDES = [
    "data.tasks=[add, upper]", "data.max_per_task=24", "data.max_length=80", "partition.test_size=4",
    "federation.rounds=1", "federation.local_steps=2", "eval.every=1", "plots=false",
    "refine.method=shed", "refine.budget_fraction=0.5", "refine.strategy=qocs", "refine.clusters=4",
    "refine.iterations=2",
    "refine.steps=2", "refine.embedder=hashing", "refine.max_val=4",
]


def test_run_with_refine_section_refines_each_client(tmp_path):
    from mira.cli import main

    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--quiet"]
    for o in OVERRIDES:
        args += ["--set", o]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    # 24 records per task -> 20 train / 4 test; SHED holds 2 of the 20 out for v(S) and keeps half of 18
    assert [c["n_train"] for c in summary["clients"]] == [9, 9]
    assert (out / "config.yaml").read_text().count("refine:") == 1


def test_refine_clients_uses_only_each_clients_data_and_is_deterministic():
    from mira.data.partition import partition
    from mira.data.records import load_records
    from mira.shed.federated import refine_clients

    cfg, _ = load_config(None, OVERRIDES)
    clients = partition(load_records(cfg.data, seed=0), cfg.partition, seed=0)
    logs: list[str] = []
    reports: list[dict] = []
    a = refine_clients(clients, cfg, logs.append, reports=reports)
    b = refine_clients(clients, cfg)
    for before, after, again in zip(clients, a, b, strict=True):
        assert after.id == before.id and after.test == before.test
        assert set(after.train) <= set(before.train) and len(after.train) == 9
        assert after.train == again.train
    # per client: the same reliability figures as ``mira refine`` (2 iterations = one antithetic pair: the
    # split half is not measurable, and the client is told so)
    summary = [line for line in logs if "keeps" in line]
    assert len(summary) == 2 and "keeps 9/20" in summary[0]
    for line in summary:
        assert "split-half r n/a" in line and "mean SE" in line and "v(S) noise sd" in line
        assert "v(S) evaluations" in line and "cache hits" in line
    assert sum("NOT MEASURED" in line for line in logs) == 2
    assert [r["client"] for r in reports] == [c.id for c in clients]
    assert all(r["reliability"]["iterations"] == 2 and r["reliability"]["noise_sd"] is not None for r in reports)


def test_refine_clients_reports_a_measured_split_half_per_client():
    from mira.data.partition import partition
    from mira.data.records import load_records
    from mira.shed.federated import refine_clients

    cfg, _ = load_config(None, [o for o in OVERRIDES if not o.startswith("refine.iterations")]
                         + ["refine.iterations=4", "refine.clusters=5"])
    clients = partition(load_records(cfg.data, seed=0), cfg.partition, seed=0)
    reports: list[dict] = []
    refine_clients(clients, cfg, reports=reports)
    for r in reports:
        rel = r["reliability"]
        assert rel["units"] == 2 and rel["split_half"] is not None and -1 <= rel["split_half"] <= 1
        assert isinstance(rel["reliable"], bool) and rel["verdict"]


@pytest.mark.parametrize("override, needle", [
    ("refine.budget_fraction=2.5", "refine.budget_fraction"),
    ("refine.budget=0.5", "refine.budget: 'budget' is ambiguous"),
    ("refine.strategy=top", "refine.strategy"),
    ("refine.colour=red", "refine.colour: unknown option"),
    ("refine.method=less", "refine.method"),
    ("refine.epochs=1", "refine.epochs: 'epochs' was removed"),
    ("refine.budget_records=50", "budget 50 records is larger than the 18 candidate records"),
])
def test_bad_refine_options_are_one_line_errors(override, needle):
    from mira.data.partition import partition
    from mira.data.records import load_records
    from mira.shed.federated import refine_clients

    same = override.split("=")[0].startswith("refine.budget")  # one budget at a time
    cfg, _ = load_config(None, [o for o in OVERRIDES if not (same and o.startswith("refine.budget"))] + [override])
    clients = partition(load_records(cfg.data, seed=0), cfg.partition, seed=0)
    with pytest.raises(MiraError, match=needle.replace(".", r"\.")):
        refine_clients(clients, cfg)
