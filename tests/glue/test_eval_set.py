"""``validation.skip_per_task`` drops exactly the records a run drew (issue 11)."""
from __future__ import annotations

import json
from collections import Counter

from mira.config import DataConfig
from mira.data.records import Record, load_records
from mira.glue.pipeline import load_eval_set
from mira.glue.zoo import EvalSetSpec


def test_skip_per_task_excludes_exactly_the_runs_draw(tiny_model_dir, tmp_path):
    from mira.models.loader import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    records = [Record(instruction=f"say {t} {i}", input="", output=f"{t}{i}", task=t)
               for t in ("b_task", "a_task", "c_task") for i in range(30 if t != "c_task" else 12)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    for seed in (0, 3):
        # what a run with data: {max_per_task: 8, seed: SEED} trains and tests on
        run = load_records(DataConfig(source="json", path=str(path), max_per_task=8, seed=seed), seed=seed)
        es = EvalSetSpec(path=str(path), max_per_task=100, max_length=64, skip_per_task=8, seed=seed)
        ds = load_eval_set(es, tmp_path, tok, "validation")
        got = Counter(ds.records)
        assert not set(got) & set(run)  # no leak
        # and nothing else was dropped
        assert got == Counter(r for r in records if r not in set(run))
        assert {r.task for r in ds.records} == {"a_task", "b_task", "c_task"}
        assert Counter(r.task for r in ds.records) == {"a_task": 22, "b_task": 22, "c_task": 4}
