"""``mira refine``: bad input is one line with exit code 2; a small real run writes its outputs."""
from __future__ import annotations

import json

import pytest

from mira.cli import main

from .conftest import write_jsonl

FAST = ["--embedder", "hashing", "--iterations", "1", "--steps", "2", "--max-length", "80", "--quiet"]


def refine(data, out, *extra):
    return main(["refine", str(data), "--out", str(out), *FAST, *extra])


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.1", "0.0", "abc"])
def test_budget_fraction_outside_range_exit_2(tmp_path, data_file, capsys, budget):
    assert refine(data_file, tmp_path / "r.jsonl", "--budget-fraction", budget) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--budget-fraction" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("budget", ["1", "1.0", "0.1", "500"])
def test_old_budget_flag_is_a_clear_error(tmp_path, data_file, capsys, budget):
    """``--budget 1`` (one record) vs ``1.0`` (everything) was a trap: the flag is gone, with a pointer."""
    assert refine(data_file, tmp_path / "r.jsonl", "--budget", budget) == 2
    err = capsys.readouterr().err
    assert "--budget-records N" in err and "--budget-fraction F" in err and len(err.strip().splitlines()) == 1


def test_budget_records_and_both_budgets(tmp_path, data_file, capsys):
    assert refine(data_file, tmp_path / "r.jsonl", "--budget-records", "500") == 2
    assert "larger than the 108 candidate records" in capsys.readouterr().err
    assert refine(data_file, tmp_path / "r.jsonl", "--budget-records", "0") == 2
    assert "--budget-records" in capsys.readouterr().err
    assert refine(data_file, tmp_path / "r.jsonl", "--budget-records", "3", "--budget-fraction", "0.5") == 2
    assert "not both" in capsys.readouterr().err
    assert refine(data_file, tmp_path / "r.jsonl", "--epochs", "1") == 2
    assert "--epochs was removed" in capsys.readouterr().err


def test_more_clusters_than_records_exit_2(tmp_path, data_file, capsys):
    assert refine(data_file, tmp_path / "r.jsonl", "--clusters", "200") == 2
    assert "more clusters (200) than candidate records (108)" in capsys.readouterr().err


def test_empty_dataset_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert refine(empty, tmp_path / "r.jsonl") == 2
    assert "empty" in capsys.readouterr().err


def test_records_without_text_exit_2(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Say hi.", "output": "hi"},
                                               {"instruction": "Say bye.", "output": "   "}] * 5)
    assert refine(bad, tmp_path / "r.jsonl") == 2
    assert "record 1 (0-based, in input order) has no output text" in capsys.readouterr().err
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"instruction": "Say hi."}])
    assert refine(missing, tmp_path / "r.jsonl") == 2
    assert "missing.jsonl:1" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["--strategy", "best"], "unknown strategy"),
    (["--iterations", "0"], "--iterations"),
    (["--val-fraction", "1.0"], "--val-fraction"),
    (["--source", "nope"], "unknown data source"),
])
def test_other_bad_options_exit_2(tmp_path, data_file, capsys, args, needle):
    assert refine(data_file, tmp_path / "r.jsonl", *args) == 2
    assert needle in capsys.readouterr().err


def test_missing_file_exit_2(tmp_path, capsys):
    assert refine(tmp_path / "nope.jsonl", tmp_path / "r.jsonl") == 2
    assert "not found" in capsys.readouterr().err


def test_refine_writes_jsonl_report_and_plot(tmp_path, data_file, capsys):
    out = tmp_path / "o" / "refined.jsonl"
    assert refine(data_file, out, "--budget-fraction", "0.2", "--strategy", "qwcs", "--clusters", "4", "--seed", "3",
                  "--model", "builtin:demo") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == round(0.2 * 108)
    assert set(rows[0]) == {"instruction", "input", "output", "task"}
    report = json.loads((out.parent / "shed.json").read_text())
    assert report["budget_count"] == len(rows) and len(report["clusters"]) == 4
    assert (out.parent / "shed_values.png").stat().st_size > 1000
    rel = report["reliability"]  # always reported: here 1 iteration, so not measurable, and said so
    assert rel["split_half"] is None and not rel["reliable"] and "NOT MEASURED" in rel["verdict"]
    assert rel["evaluations"] >= 2 and "cache_hits" in rel and report["wall_s"] > 0
    assert "warning: reliability NOT MEASURED" in capsys.readouterr().err  # even with --quiet


def test_default_budget_is_a_tenth(tmp_path, data_file):
    out = tmp_path / "refined.jsonl"
    assert refine(data_file, out, "--clusters", "4") == 0
    assert len(out.read_text().splitlines()) == round(0.1 * 108)


def test_console_summary_shows_reliability(tmp_path, data_file, capsys):
    out = tmp_path / "refined.jsonl"
    args = [a for a in FAST if a != "--quiet"]
    args[args.index("--iterations") + 1] = "4"
    assert main(["refine", str(data_file), "--out", str(out), *args, "--clusters", "5", "--budget-records", "10"]) == 0
    text = capsys.readouterr().out
    assert "split-half rank correlation of the cluster values:" in text
    assert "noise of one v(S)" in text and "mean standard error" in text
    assert "cache hits" in text and "v(S) computed" in text


def test_quiet_silences_the_loading_weights_bar(tmp_path, data_file, capfd):
    """``--quiet`` with the sentence-embedding model: no "Loading weights" bar on stderr."""
    out = tmp_path / "refined.jsonl"
    args = [a if a != "hashing" else "all-MiniLM-L6-v2" for a in FAST]
    assert main(["refine", str(data_file), "--out", str(out), *args, "--clusters", "4"]) == 0
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err and "Loading weights" not in captured.out
    assert "Loading SentenceTransformer" not in captured.err
