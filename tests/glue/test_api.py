"""``run_glue`` from Python: the auto mixture with CMA-ES, and a zoo of full models with a base."""
from __future__ import annotations

import json
import shutil

import torch
import yaml


def test_auto_mixture_with_evolutionary(tiny_zoo, tmp_path):
    from mira.glue import run_glue

    zoo = yaml.safe_load((tiny_zoo / "zoo.yaml").read_text())
    zoo.update(strategy={"name": "evolutionary", "budget": 4}, mixture={"kind": "auto"})
    zoo["validation"]["path"] = str(tiny_zoo / "val.jsonl")
    zoo["test"]["path"] = str(tiny_zoo / "val.jsonl")
    zoo["members"] = [dict(m, path=str(tiny_zoo / m["path"])) for m in zoo["members"]]
    res = run_glue(zoo, tmp_path / "out")
    by = {e["name"]: e for e in res["entries"]}
    assert res["final"] == min(("router", "lora_mixture"), key=lambda n: by[n]["val_mean_loss"])
    assert res["clusters"][0]["strategy"] == "evolutionary"
    assert res["clusters"][0]["search"]["budget"] == 4 and "generations" in res["clusters"][0]["search"]
    assert by["cluster_0"]["val_mean_loss"] <= by["ad_add"]["val_mean_loss"] + 1e-6
    assert json.loads((tmp_path / "out" / "glue.json").read_text())["final"] == res["final"]


def test_full_model_zoo(tiny_model_dir, tiny_zoo, tmp_path):
    """Two fine-tunes of the tiny model (perturbed copies) plus an exact copy, compared on task vectors."""
    from safetensors.torch import load_file, save_file

    from mira.glue import run_glue

    for name, seed in (("ft_a", 1), ("ft_b", 2)):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        weights = folder / "model.safetensors"
        state = load_file(str(weights))
        g = torch.Generator().manual_seed(seed)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in state.items()}
        save_file(state, str(weights), metadata={"format": "pt"})
    shutil.copytree(tmp_path / "ft_a", tmp_path / "ft_a_copy")
    zoo = {"base_model": str(tiny_model_dir),
           "members": [{"path": str(tmp_path / n), "task": t}
                       for n, t in (("ft_a", "add"), ("ft_b", "upper"), ("ft_a_copy", "add"))],
           "validation": {"path": str(tiny_zoo / "val.jsonl"), "max_per_task": 4, "max_length": 80},
           "strategy": {"name": "heuristic_coefficient"}}
    res = run_glue(zoo, tmp_path / "out")
    assert res["zoo"]["kind"] == "model" and res["merge_method"] == "task_arithmetic"
    assert [c["members"] for c in res["clusters"]] == [["ft_a", "ft_a_copy"], ["ft_b"]]
    assert "base" in [e["name"] for e in res["entries"]] and res["final"] == "router"
    assert (tmp_path / "out" / "clusters" / "cluster_0" / "config.json").exists()
