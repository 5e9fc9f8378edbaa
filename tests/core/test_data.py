import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from mira.config import DataConfig, PartitionConfig
from mira.data.partition import partition
from mira.data.prompts import IGNORE, MARKER, collate, format_prompt, tokenize_records
from mira.data.records import Record, load_records
from mira.data.synthetic import RELATED_PAIRS, TASKS, generate_suite
from mira.errors import MiraError


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_loss_only_on_response_tokens(tok):
    r = Record(instruction="Add the two numbers.", input="2 + 3", output="5", task="add")
    ds = tokenize_records([r], tok, max_length=128)
    ids, labels = ds.input_ids[0], ds.labels[0]
    n_prompt = ds.prompt_lens[0]
    assert all(t == IGNORE for t in labels[:n_prompt])
    target = [t for t in labels if t != IGNORE]
    assert target[-1] == tok.eos_token_id
    assert tok.decode(target[:-1]).strip() == "5"
    assert labels[n_prompt:] == ids[n_prompt:]
    assert "### Input:\n2 + 3" in format_prompt(r)
    assert tok.decode(ids[:n_prompt]).rstrip().endswith(MARKER.strip())


def test_collate_pads_to_longest(tok):
    recs = generate_suite(3, seed=1, tasks=["add", "reverse_words"])
    ds = tokenize_records(recs, tok, max_length=64)
    batch = collate(ds, [0, 4], pad_id=tok.pad_token_id)
    longest = max(len(ds.input_ids[0]), len(ds.input_ids[4]))
    assert batch["input_ids"].shape == (2, longest)
    short = 0 if len(ds.input_ids[0]) < longest else 1
    n = len(ds.input_ids[[0, 4][short]])
    assert batch["attention_mask"][short].sum() == n
    assert (batch["labels"][short, n:] == IGNORE).all()


def test_synthetic_suite_is_deterministic_with_related_pairs():
    a, b = generate_suite(5, seed=0), generate_suite(5, seed=0)
    assert a == b and a != generate_suite(5, seed=1)
    assert len(TASKS) >= 8 and len({r.task for r in a}) == len(TASKS)
    assert all(x in TASKS and y in TASKS for x, y in RELATED_PAIRS)
    add = [r for r in a if r.task == "add"][0]
    x, y = add.input.split(" + ")
    assert int(add.output) == int(x) + int(y)


def _records():
    return generate_suite(20, seed=0, tasks=["add", "sub", "upper", "lower"])


def test_by_task_partition():
    clients = partition(_records(), PartitionConfig(name="by_task", clients_per_task=2, test_size=2), seed=0)
    assert len(clients) == 8
    for c in clients:
        assert {r.task for r in c.train + c.test} == {c.task}
        assert len(c.test) == 2 and len(c.train) == 8
    again = partition(_records(), PartitionConfig(name="by_task", clients_per_task=2, test_size=2), seed=0)
    assert [c.train for c in clients] == [c.train for c in again]


def test_dirichlet_partition_is_seeded_and_complete():
    cfg = PartitionConfig(name="dirichlet", num_clients=4, alpha=0.3, test_fraction=0.2)
    a = partition(_records(), cfg, seed=1)
    b = partition(_records(), cfg, seed=1)
    assert [c.train for c in a] == [c.train for c in b]
    everything = [r for c in a for r in c.train + c.test]
    assert sorted(map(repr, everything)) == sorted(map(repr, _records()))
    # a small alpha concentrates each client on few tasks
    shares = [max(np.unique([r.task for r in c.train + c.test], return_counts=True)[1]) / len(c.train + c.test) for c in a]
    assert np.mean(shares) > 0.4


def test_iid_partition_sizes():
    clients = partition(_records(), PartitionConfig(name="iid", num_clients=4, test_size=4), seed=0)
    assert [len(c.train) + len(c.test) for c in clients] == [20, 20, 20, 20]


def test_too_few_examples_is_an_error():
    with pytest.raises(MiraError, match="client .* training"):
        partition(generate_suite(1, tasks=["add"]), PartitionConfig(name="by_task"), seed=0)


def test_json_loader_with_field_map_and_line_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"q": "Say hi", "a": "hi", "cat": "greet"}) + "\n\n" +
                    json.dumps({"q": "Say bye", "a": "bye", "cat": "greet"}) + "\n")
    cfg = DataConfig(source="json", path=str(good), field_map={"instruction": "q", "output": "a", "task": "cat"},
                     max_per_task=None)
    recs = load_records(cfg)
    assert recs == [Record("Say hi", "hi", "", "greet"), Record("Say bye", "bye", "", "greet")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x", "a": "y"}) + "\n{not json\n")
    with pytest.raises(MiraError, match=r"bad.jsonl:2: malformed JSON"):
        load_records(cfg.model_copy(update={"path": str(bad)}))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"q": "x"}) + "\n")
    with pytest.raises(MiraError, match=r"missing.jsonl:1: missing field 'a'"):
        load_records(cfg.model_copy(update={"path": str(missing)}))


def test_natural_instructions_file_format(tmp_path):
    task = {"Title": "t", "Definition": "Answer the question.", "Instances": [
        {"input": "Q1", "output": ["A1", "A1b"]}, {"input": "Q2", "output": ["A2"]}]}
    (tmp_path / "subtask999_demo.json").write_text(json.dumps(task))
    recs = load_records(DataConfig(source="natural_instructions", path=str(tmp_path), max_per_task=None))
    assert recs[0] == Record("Answer the question.", "A1", "Q1", "subtask999_demo")
    assert len(recs) == 2


@pytest.mark.assets
def test_real_loaders(assets):
    dolly = load_records(DataConfig(source="dolly", path=str(assets / "data/dolly-15k/databricks-dolly-15k.jsonl"),
                                    max_per_task=None))
    assert len(dolly) > 14000 and len({r.task for r in dolly}) == 8
    ni = load_records(DataConfig(source="natural_instructions", path=str(assets / "data/natural-instructions-v1/tasks"),
                                 tasks=["subtask003_mctaco_question_generation_event_duration"], max_per_task=50))
    assert len(ni) == 50 and ni[0].instruction.startswith("In this task")
    gsm = load_records(DataConfig(source="gsm8k", path=str(assets / "data/gsm8k/test.jsonl"), max_per_task=None))
    assert len(gsm) == 1319 and "####" in gsm[0].output
