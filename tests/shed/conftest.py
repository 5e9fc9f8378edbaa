"""Shared fixtures for the SHED tests: synthetic records, JSONL files and a fake value function."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MIRA_THREADS", "1")
torch.set_num_threads(1)

from mira.data.records import Record  # noqa: E402
from mira.data.synthetic import generate_suite  # noqa: E402


def write_jsonl(path: Path, records: list[Record] | list[dict]) -> Path:
    rows = [r.to_dict() if isinstance(r, Record) else r for r in records]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def records() -> list[Record]:
    """120 synthetic records: 4 tasks x 30."""
    return generate_suite(n_per_task=30, seed=0, tasks=["add", "reverse_chars", "upper", "sort_digits"])


@pytest.fixture
def data_file(tmp_path, records) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", records)


class TaskValue:
    """A deterministic fake v(S): additive, each proxy worth a fixed amount by its task."""

    WORTH = {"add": 3.0, "reverse_chars": -1.0, "upper": 1.0, "sort_digits": 0.5}

    def __init__(self, proxy_records: list[Record]):
        self.w = [self.WORTH[r.task] for r in proxy_records]
        self.calls = 0

    def __call__(self, coalition: frozenset) -> float:
        self.calls += 1
        return float(sum(self.w[i] for i in coalition))


@pytest.fixture
def assets() -> Path:
    root = os.environ.get("MIRA_ASSETS")
    if not root:
        pytest.skip("MIRA_ASSETS is not set")
    return Path(root)
