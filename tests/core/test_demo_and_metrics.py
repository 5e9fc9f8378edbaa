import copy

import pytest

import mira.models.demo as demo
from mira.config import load_config, validate
from mira.eval.metrics import generation_metrics
from mira.federated.engine import Engine, Workspace
from mira.models.loader import load_base


def test_generation_metrics():
    m = generation_metrics(["the cat sat", "12", "x"], ["the cat sat", "13", "y z"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["rouge_l"] == pytest.approx(1 / 3)
    assert generation_metrics(["Sun Dog"], ["sun dog"])["exact_match"] == 1.0


def test_engine_reports_generation_metrics(tiny_cfg, tmp_path):
    raw = copy.deepcopy(tiny_cfg)
    raw["eval"].update(generation=True, max_new_tokens=4, max_examples=2)
    raw["federation"]["rounds"] = 1
    cfg = validate(raw)
    s = Engine(Workspace.load(cfg), cfg, tmp_path).run()
    assert 0 <= s["mean_rouge_l"] <= 1 and 0 <= s["mean_exact_match"] <= 1
    assert "rouge_l" in s["clients"][0]


def test_embedded_default_config_is_self_contained():
    cfg, _ = load_config(None)
    assert cfg.model.path == "builtin:demo" and cfg.data.source == "synthetic"
    assert cfg.data.path is None


def test_demo_model_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRA_CACHE", str(tmp_path))
    calls = []
    real = demo.pretrain

    def short(model, tok, **kw):
        calls.append(1)
        losses = real(model, tok, steps=40, batch_size=16, log=None)
        assert losses[-1] < losses[0] - 1.0  # it learns
        return losses

    monkeypatch.setattr(demo, "pretrain", short)
    path = demo.ensure_demo_model("demo", log=None)
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()
    assert demo.ensure_demo_model("demo", log=None) == path and len(calls) == 1
    model, tok = load_base("builtin:demo")
    assert model.config.num_hidden_layers == 3 and tok.eos_token == "</s>"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo-")]


def test_gsm8k_answer_reads_the_final_number():
    from mira.eval.metrics import gsm8k_answer, gsm8k_exact_match

    assert gsm8k_answer("3 + 4 = <<3+4=7>>7 apples\n#### 7") == "7"
    assert gsm8k_answer("so she pays #### 1,250.00 dollars, not 3") == "1250"
    assert gsm8k_answer("He has 5, then 6.50 in all.") == "6.5"  # no ####: the last number
    assert gsm8k_answer("#### -3") == "-3"
    assert gsm8k_answer("no number here") is None
    refs = ["... #### 18", "... #### 3", "... #### 70000"]
    assert gsm8k_exact_match(["so 18", "#### 4", "the answer is 70,000"], refs) == [1.0, 0.0, 1.0]
    assert gsm8k_exact_match(["nothing"], ["#### 1"]) == [0.0]
