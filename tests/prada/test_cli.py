"""``mira proxy train``, ``mira proxy generate`` and ``mira serve`` through ``mira.cli.main``."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM


def test_proxy_train_writes_a_loadable_peft_adapter(zoo):
    from peft import PeftModel

    from mira.models.loader import load_base

    files = {p.name for p in zoo.adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "mira_training.json"} <= files
    summary = json.loads((zoo.adapter / "mira_training.json").read_text())
    assert summary["steps"] == 40 and summary["records"] == 90 and summary["settings"]["rank"] == 4
    base, _ = load_base(str(zoo.proxy))
    model = PeftModel.from_pretrained(base, str(zoo.adapter))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().max()) > 0 for p in lora_b)  # trained (B starts at zero)
    config = json.loads((zoo.adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("args, expected", [
    (["--data", "missing.jsonl"], "not found: missing.jsonl"),
    (["--max-records", "0"], "--max-records"),
    (["--steps", "0"], "--steps: steps must be at least 1"),
    (["--source", "nope"], "unknown data source 'nope'"),
])
def test_proxy_train_bad_input_exits_2_with_one_line(cli, zoo, tmp_path, capsys, args, expected):
    base = ["proxy", "train", "--proxy", str(zoo.proxy), "--data", str(zoo.data), "--out", str(tmp_path / "a"), "-q"]
    assert cli(base + args) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def generate_args(server, zoo, *extra: str) -> list[str]:
    return ["proxy", "generate", "--server", server.url, "--proxy", str(zoo.proxy), "--adapter", str(zoo.adapter),
            "--prompt", "Reverse the order of the words.", "--input", "cat dog sun", "-n", "12", "--json", *extra]


def test_proxy_generate_prints_the_text_and_metrics_as_json(cli, zoo, server, capsys, monkeypatch):
    from .conftest import API_KEY

    monkeypatch.setenv("MIRA_API_KEY", API_KEY)
    outputs = {}
    for mode in ("per-token", "speculative"):
        assert cli(generate_args(server, zoo, "--mode", mode)) == 0
        outputs[mode] = json.loads(capsys.readouterr().out)
    slow, fast = outputs["per-token"], outputs["speculative"]
    assert fast["token_ids"] == slow["token_ids"] and fast["text"] == slow["text"]
    assert slow["metrics"]["round_trips"] == len(slow["token_ids"])
    assert set(fast["metrics"]) >= {"round_trips", "bytes_sent", "bytes_received", "tokens_per_second",
                                    "acceptance_rate"}
    assert cli(generate_args(server, zoo, "--mode", "per-token", "--top-k", "4", "--encoding", "list")) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["bytes_received"] > 0


@pytest.mark.parametrize("key, extra, expected", [
    ("wrong", [], "401 from /v1/logits: missing or wrong API key (after 0 generated tokens"),
    (None, [], "set the server's API key in the environment variable MIRA_API_KEY"),
    ("k", ["--mode", "beam"], "unknown mode 'beam'"),
    ("k", ["--draft-initial", "0"], "draft lengths need"),
])
def test_proxy_generate_errors_exit_2_with_one_line(cli, zoo, server, capsys, monkeypatch, key, extra, expected):
    if key is None:
        monkeypatch.delenv("MIRA_API_KEY", raising=False)
    else:
        monkeypatch.setenv("MIRA_API_KEY", key)
    assert cli(generate_args(server, zoo, "--mode", "per-token", *extra)) == 2
    err = capsys.readouterr().err
    assert expected in err.replace("\n", "") and err.count("\n") == 1


def test_serve_refuses_to_start_without_a_key(cli, zoo, capsys, monkeypatch):
    monkeypatch.delenv("MIRA_API_KEY", raising=False)
    assert cli(["serve", str(zoo.target), "--port", "1"]) == 2
    assert "set the API key in the environment variable MIRA_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("MIRA_API_KEY", "k")
    assert cli(["serve", str(zoo.target), "--max-draft", "0"]) == 2
    assert "max_draft must be at least 1" in capsys.readouterr().err


def test_the_server_app_serves_in_process(zoo):
    """``create_app`` with FastAPI's test client: the same app that ``mira serve`` runs."""
    from fastapi.testclient import TestClient

    from mira.models.loader import load_base
    from mira.prada.server import ServerLimits, create_app

    model, _ = load_base(str(zoo.target))
    with TestClient(create_app(model, "k", ServerLimits(max_draft=3))) as http:
        assert http.get("/health").json()["max_draft"] == 3
        r = http.post("/v1/draft", json={"prefix": [1, 2], "n": 3}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and 1 <= len(r.json()["tokens"]) <= 3


def _dolly(path, n=24):
    rows = [{"instruction": f"Reverse the words {i}", "context": "", "response": f"words the reverse {i}",
             "category": "open_qa"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_proxy_shrink_distils_its_source_into_the_kept_layers(cli, zoo, tmp_path, capsys):
    out = tmp_path / "proxy"
    rc = cli(["proxy", "shrink", "--source", str(zoo.target), "--out", str(out), "--keep-layers", "1",
              "--heal-dolly", str(_dolly(tmp_path / "dolly.jsonl")), "--heal-distill", "--heal-steps", "4",
              "--heal-batch", "4", "--heal-lr", "3e-3", "--max-length", "96"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "shrink.json").read_text())
    assert report["kept_layers"] == [1] and report["heal"]["mode"] == "distill"
    assert report["heal"]["train_tokens"] > 0 and report["heal"]["heldout_loss_after"] > 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_proxy_shrink_with_no_record_that_fits_exits_2(cli, zoo, tmp_path, capsys):
    assert cli(["proxy", "shrink", "--source", str(zoo.target), "--out", str(tmp_path / "p"), "--keep-layers", "1",
                "--heal-dolly", str(_dolly(tmp_path / "dolly.jsonl")), "--heal-distill", "--max-length", "8"]) == 2
    err = capsys.readouterr().err
    assert "--max-length" in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("layers, expected", [("0-x", "--keep-layers"), ("0,1", "--keep-layers"),
                                              ("1,0", "--keep-layers")])
def test_proxy_shrink_bad_layers_exit_2_with_one_line(cli, zoo, tmp_path, capsys, layers, expected):
    assert cli(["proxy", "shrink", "--source", str(zoo.target), "--out", str(tmp_path / "p"),
                "--keep-layers", layers]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()
