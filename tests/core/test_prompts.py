"""Templates, the prompt/response boundary, the length policy and its report (issue: intact prompts)."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from mira.cli import main
from mira.config import DataConfig, load_config
from mira.data.prompts import (CUT_MARK, IGNORE, TEMPLATES, check_client_stats, get_template, tokenize_records)
from mira.data.records import Record, load_records
from mira.errors import MiraError
from tests.conftest import write_yaml

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_tok(tiny_model_dir):
    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = CHAT
    return t


REC = Record(instruction="Add the two numbers.", input="2 + 3", output="5", task="add")


@pytest.mark.parametrize("spec", ["alpaca", "compact", "chat", "Q: {instruction} {input}\nA: "])
def test_every_template_masks_the_prompt_and_keeps_the_response(spec, tok, chat_tok):
    t = chat_tok if spec == "chat" else tok
    ds = tokenize_records([REC], t, 128, spec)
    ids, labels, n = ds.input_ids[0], ds.labels[0], ds.prompt_lens[0]
    assert labels[:n] == [IGNORE] * n and labels[n:] == ids[n:]
    target = labels[n:]
    assert target[-1] == t.eos_token_id
    assert t.decode(target[:-1]).strip() == "5"
    # the prompt is exactly what the model is given at inference
    prompt_text, _ = get_template(spec, t).split(REC)
    assert t.decode(ids[:n], skip_special_tokens=True).replace(" ", "") == \
        t.decode(t(prompt_text, add_special_tokens=False)["input_ids"], skip_special_tokens=True).replace(" ", "")
    assert "2 + 3" in prompt_text and "Add the two numbers." in prompt_text


def test_auto_is_chat_when_the_tokenizer_has_a_template(tok, chat_tok):
    assert get_template("auto", chat_tok).name == "chat"
    assert get_template("auto", tok).name == "alpaca"
    ds = tokenize_records([REC], chat_tok, 128, "auto")
    assert chat_tok.decode(ds.input_ids[0][: ds.prompt_lens[0]]).rstrip().endswith("assistant<unk><unk>")
    with pytest.raises(MiraError, match="chat template"):
        get_template("chat", tok)


def test_template_string_is_validated():
    with pytest.raises(MiraError, match="instruction"):
        get_template("Answer {question}", None)
    with pytest.raises(MiraError, match="unknown template"):
        get_template("alpacca", None)
    assert set(TEMPLATES) >= {"alpaca", "compact", "chat"}


def test_a_merge_across_the_boundary_fails_loudly(tok):
    # "### Resp" + "onse: 5" tokenises to one "Response" piece: the split would be a lie
    with pytest.raises(MiraError, match="merges the end of the prompt"):
        tokenize_records([Record("Add", "onse: 5", "", "add")], tok, 128, "{instruction}\n### Resp")


def test_trailing_space_of_a_prompt_moves_into_the_response(tok):
    ds = tokenize_records([REC], tok, 128, "compact")
    prompt = tok.decode(ds.input_ids[0][: ds.prompt_lens[0]])
    assert prompt.rstrip().endswith("Response:") and not prompt.endswith(" ")


def _long(n_words_input: int, n_words_output: int, instruction: str = "Copy the words.") -> Record:
    words = [f"w{i}" for i in range(max(n_words_input, n_words_output))]
    return Record(instruction=instruction, input=" ".join(words[:n_words_input]),
                  output=" ".join(words[:n_words_output]), task="t")


def test_drop_leaves_out_long_examples_and_counts_them(tok):
    ds = tokenize_records([REC, _long(80, 3)], tok, 64, "compact", overflow="drop")
    assert len(ds) == 1 and ds.records == [REC]
    st = ds.stats
    assert (st.before, st.after, st.dropped, st.truncated) == (2, 1, 1, 0)
    assert st.length_to_keep(90) > 64


def test_truncate_input_cuts_the_middle_then_the_response_never_the_instruction(tok):
    r = _long(80, 80, instruction="Copy the words exactly.")
    ds = tokenize_records([r], tok, 96, "compact", overflow="truncate_input", min_response_tokens=16)
    assert len(ds) == 1
    ids, n = ds.input_ids[0], ds.prompt_lens[0]
    assert len(ids) <= 96
    prompt = tok.decode(ids[:n])
    assert "Copy the words exactly." in prompt.replace("  ", " ")
    assert "..." in prompt  # the cut mark (its brackets are <unk> in this tiny vocabulary)
    assert "w0" in prompt and "w79" in prompt  # head and tail kept
    assert n <= 96 - 16  # room for at least min_response_tokens
    assert len(ids) - n >= 16
    assert ds.labels[0][-1] != tok.eos_token_id  # a cut response gets no EOS
    st = ds.stats
    assert (st.input_truncated, st.response_truncated, st.prompt_intact) == (1, 1, 0)


def test_an_instruction_that_does_not_fit_is_dropped_not_cut(tok):
    r = Record(instruction=" ".join(f"x{i}" for i in range(200)), input="a b", output="c", task="t")
    ds = tokenize_records([r], tok, 64, "compact", overflow="truncate_input")
    assert len(ds) == 0 and ds.stats.dropped == 1


@pytest.mark.parametrize("overflow", ["drop", "truncate_input"])
def test_prompt_does_not_depend_on_the_response_length(tok, overflow):
    base = [_long(n, 1) for n in (5, 30, 60, 90)]
    short = [Record(r.instruction, "ok", r.input, r.task) for r in base]
    longer = [Record(r.instruction, " ".join(["yes"] * 12), r.input, r.task) for r in base]
    a = tokenize_records(short, tok, 160, "compact", overflow=overflow)
    b = tokenize_records(longer, tok, 160, "compact", overflow=overflow)
    pa = {r.input: ids[:n] for r, ids, n in zip(a.records, a.input_ids, a.prompt_lens)}
    pb = {r.input: ids[:n] for r, ids, n in zip(b.records, b.input_ids, b.prompt_lens)}
    common = set(pa) & set(pb)
    assert len(common) >= 2 and all(pa[k] == pb[k] for k in common)
    if overflow == "truncate_input":
        assert a.stats.input_truncated >= 1 and len(common) == 4


def test_a_client_losing_more_than_half_is_an_error_naming_it(tok):
    ds = tokenize_records([_long(80, 3)] * 3 + [REC], tok, 64, "compact")
    with pytest.raises(MiraError) as e:
        check_client_stats(4, "copy", ds.stats, DataConfig(max_length=64))
    msg = str(e.value)
    assert "client 4" in msg and "'copy'" in msg and f"data.max_length={ds.stats.length_to_keep(90)}" in msg


def test_run_refuses_a_config_that_loses_a_client(tiny_cfg, tmp_path, capsys):
    tiny_cfg["data"]["max_length"] = 40
    cfg = write_yaml(tmp_path / "c.yaml", tiny_cfg)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "client" in err and "data.max_length=" in err and "Traceback" not in err


def test_summary_reports_the_data(tiny_cfg, tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_cfg)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0
    data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert data["template"] == "alpaca" and data["overflow"] == "drop"
    assert len(data["clients"]) == 4 and data["prompt_intact_fraction"] == 1.0
    c = data["clients"][0]
    assert c["before"] == c["after"] + c["dropped"] and c["prompt_tokens"]["p50"] > 0


def test_data_inspect_prints_table_and_masked_examples(tiny_cfg, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_cfg)
    assert main(["data", "inspect", str(cfg), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "prompt whole" in out and "masked prompt, no loss" in out and "response, in the loss" in out
    assert out.count("training example") == 8
    assert main(["data", "inspect", str(cfg), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["before"] == rep["after"] and len(rep["clients"]) == 4
    assert main(["data", "inspect", str(cfg), "--set", "data.max_length=40"]) == 2
    assert "would lose" in capsys.readouterr().err


def test_embedded_default_keeps_every_prompt_whole(capsys):
    assert main(["data", "inspect", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["prompt_intact_fraction"] == 1.0


@pytest.mark.assets
@pytest.mark.parametrize("example", ["dolly", "natural_instructions"])
def test_shipped_examples_keep_95pct_of_prompts_whole(example, assets, capsys):
    assert main(["data", "inspect", f"examples/{example}.yaml", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["prompt_intact_fraction"] >= 0.95
    assert all(c["prompt_intact_fraction"] >= 0.9 for c in rep["clients"])


@pytest.mark.assets
def test_real_records_prompt_independent_of_response_and_instruction_kept(assets):
    """On real Dolly records (contexts included) and stories260K's tokenizer: the prompt tokens are the
    same whatever the response, and every kept prompt still holds its whole instruction."""
    tok = AutoTokenizer.from_pretrained(assets / "models" / "stories260K")
    cfg = DataConfig(source="dolly", path=str(assets / "data/dolly-15k/databricks-dolly-15k.jsonl"), max_per_task=40)
    recs = load_records(cfg, seed=0)
    swapped = [Record(r.instruction, recs[(i + 7) % len(recs)].output, r.input, r.task) for i, r in enumerate(recs)]
    for overflow in ("drop", "truncate_input"):
        a = tokenize_records(recs, tok, 256, "compact", overflow=overflow)
        b = tokenize_records(swapped, tok, 256, "compact", overflow=overflow)
        pa = {(r.instruction, r.input): ids[:n] for r, ids, n in zip(a.records, a.input_ids, a.prompt_lens)}
        pb = {(r.instruction, r.input): ids[:n] for r, ids, n in zip(b.records, b.input_ids, b.prompt_lens)}
        common = set(pa) & set(pb)
        assert len(common) > 50 and all(pa[k] == pb[k] for k in common)
        lens = np.array([n for n in a.prompt_lens])
        resp = np.array([len(ids) - n for ids, n in zip(a.input_ids, a.prompt_lens)])
        assert len(set(lens + resp)) > 10  # sequences are not all one length
        for r, ids, n in zip(a.records, a.input_ids, a.prompt_lens):
            words = r.instruction.split()
            assert " ".join(words[:3]) in tok.decode(ids[:n])
