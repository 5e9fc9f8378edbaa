"""Zoos whose adapters differ in rank, alpha, rsLoRA or target modules (issue 11, defect 3).

Every member is scored with the delta PEFT itself applies for it (reference: the adapter folder
loaded with ``PeftModel.from_pretrained``), and a mixed zoo runs end to end.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mira.cli import main


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def mixed_zoo(tiny_zoo, tmp_path_factory) -> Path:
    """ad_add (r 4, alpha 8), and variants: alpha 4, rsLoRA, rank 2, layer 0 only."""
    root = tmp_path_factory.mktemp("mixed")
    for name in ("ad_add", "ad_upper"):
        shutil.copytree(tiny_zoo / name, root / name)
    shutil.copytree(tiny_zoo / "ad_add", root / "add_alpha4")
    _edit_config(root / "add_alpha4", lora_alpha=4)
    shutil.copytree(tiny_zoo / "ad_upper", root / "upper_rslora")
    _edit_config(root / "upper_rslora", use_rslora=True)
    # rank 2: the best rank-2 approximation of ad_upper's factors, alpha 2
    shutil.copytree(tiny_zoo / "ad_upper", root / "upper_r2")
    w = root / "upper_r2" / "adapter_model.safetensors"
    state = load_file(str(w))
    for key in [k for k in state if ".lora_A." in k]:
        a, b = state[key], state[key.replace(".lora_A.", ".lora_B.")]
        u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
        state[key] = (s[:2, None].sqrt() * vh[:2]).contiguous()
        state[key.replace(".lora_A.", ".lora_B.")] = (u[:, :2] * s[None, :2].sqrt()).contiguous()
    save_file(state, str(w), metadata={"format": "pt"})
    _edit_config(root / "upper_r2", r=2, lora_alpha=2)
    # other target modules: layer 0 only
    shutil.copytree(tiny_zoo / "ad_add", root / "add_layer0")
    w = root / "add_layer0" / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(str(w)).items() if ".layers.0." in k}
    save_file(state, str(w), metadata={"format": "pt"})
    _edit_config(root / "add_layer0", layers_to_transform=[0])
    shutil.copy(tiny_zoo / "val.jsonl", root / "val.jsonl")
    zoo = yaml.safe_load((tiny_zoo / "zoo.yaml").read_text())
    zoo["members"] = [{"path": "ad_add", "task": "add"}, {"path": "add_alpha4", "task": "add"},
                      {"path": "ad_upper", "task": "upper"}, {"path": "upper_rslora", "task": "upper"},
                      {"path": "upper_r2", "task": "upper"}, {"path": "add_layer0", "task": "add"}]
    zoo["cluster"] = {"threshold": -1.0}  # similarity alone would put everyone together
    zoo["mixture"] = {"kind": "auto"}
    (root / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    return root


def _peft_losses(base_dir: Path, adapter: Path, ds):
    from peft import PeftModel

    from mira.glue.scoring import sequence_losses
    from mira.models.loader import load_base

    model, tok = load_base(str(base_dir), device="cpu")
    peft = PeftModel.from_pretrained(model, str(adapter))
    return sequence_losses(peft, ds, int(tok.pad_token_id), 16)


def test_members_scored_with_their_own_peft_scaling(mixed_zoo, tiny_model_dir):
    from mira.glue.pipeline import load_eval_set
    from mira.glue.scoring import Evaluator
    from mira.glue.zoo import load_members, load_zoo

    spec, root = load_zoo(mixed_zoo / "zoo.yaml")
    members, base = load_members(spec, root)
    ev = Evaluator(members, base)
    val = load_eval_set(spec.validation, root, ev.tokenizer, "validation")
    for m in members:
        got = ev.losses(m.state, val)
        want = _peft_losses(tiny_model_dir, m.path, val)
        assert got.tokens.tolist() == want.tokens.tolist()
        assert abs(got.nll.sum() - want.nll.sum()) / want.nll.sum() < 1e-5, m.name
    # the alpha-4 copy is a different function from ad_add (so the old "members[0]'s alpha" was wrong)
    a, b = ev.losses(members[0].state, val), ev.losses(members[1].state, val)
    assert abs(a.nll.sum() - b.nll.sum()) > 1e-3


def test_architecture_key_includes_lora_settings(mixed_zoo):
    from mira.glue.zoo import load_members, load_zoo

    spec, root = load_zoo(mixed_zoo / "zoo.yaml")
    members, _ = load_members(spec, root)
    by = {m.name: m for m in members}
    assert by["ad_add"].signature == by["ad_upper"].signature  # same settings, same key
    others = [m.signature for m in members if m.name != "ad_upper"]
    assert len(set(others)) == len(others)  # alpha, rsLoRA, rank, target modules all count
    q = dict((name, (r, s)) for name, r, s in by["ad_add"].lora)
    assert set(q.values()) == {(4, 2.0)}
    assert {s for _, _, s in by["upper_rslora"].lora} == {4.0}  # 8 / sqrt(4)
    assert {(r, s) for _, r, s in by["upper_r2"].lora} == {(2, 1.0)}


def test_mixed_zoo_runs_and_never_mixes_settings(mixed_zoo, tmp_path, capsys):
    out = tmp_path / "glue"
    assert main(["glue", str(mixed_zoo / "zoo.yaml"), "--out", str(out), "-q"]) == 0
    res = json.loads((out / "glue.json").read_text())
    # threshold -1 puts similar-enough members together, but only those with the same LoRA settings
    assert sorted(c["members"] for c in res["clusters"]) == sorted(
        [["ad_add", "ad_upper"], ["add_alpha4"], ["upper_rslora"], ["upper_r2"], ["add_layer0"]])
    assert res["final"] in ("router", "lora_mixture")


def test_base_model_without_tokenizer_is_one_line_error(tiny_zoo, tiny_model_dir, tmp_path, capsys):
    base = tmp_path / "base_no_tok"
    base.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, base / f.name)
    zoo = yaml.safe_load((tiny_zoo / "zoo.yaml").read_text())
    zoo["base_model"] = str(base)
    zoo["members"] = [dict(m, path=str(tiny_zoo / m["path"])) for m in zoo["members"]]
    for split in ("validation", "test"):
        zoo[split]["path"] = str(tiny_zoo / "val.jsonl")
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    assert main(["glue", str(tmp_path / "zoo.yaml"), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "Traceback" not in err
