"""``mira merge RECIPE --out DIR`` through ``mira.cli.main``: exit 0 on success, 2 on bad input."""
from __future__ import annotations

import pytest
import typer
import yaml

import mira.cli


@pytest.fixture
def cli(monkeypatch):
    """``mira.cli.main`` with only the merge command registered (on a fresh app)."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)

    @app.callback()
    def root() -> None:
        """mira"""

    monkeypatch.setattr(mira.cli, "app", app)
    monkeypatch.setattr(mira.cli, "COMMAND_MODULES", ["mira.merge.cli"])
    return mira.cli.main


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_merge_command_writes_the_model(cli, zoo, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": str(zoo["base"]),
                                         "models": [{"model": str(zoo["ft0"]), "parameters": {"density": 0.5}},
                                                    {"model": str(zoo["ft1"]), "parameters": {"density": 0.5}}]})
    assert cli(["merge", recipe, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "ties: merged 2 inputs into a Hugging Face model" in capsys.readouterr().out
    # a second run refuses to overwrite, --overwrite replaces
    assert cli(["merge", recipe, "--out", str(tmp_path / "out"), "-q"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli(["merge", recipe, "--out", str(tmp_path / "out"), "-q", "--overwrite"]) == 0


@pytest.mark.parametrize("data, expected", [
    ({"merge_method": "ties", "models": [{"model": "x", "parameters": {"density": 2}}]},
     "models[0].parameters.density: density must be in (0, 1], got 2"),
    ({"merge_method": "slerp", "models": ["{ft0}", "{ft1}", "{ft2}"]}, "models: slerp merges exactly 2 models, got 3"),
    ({"merge_method": "ties", "models": ["{ft0}", "{ft1}"]}, "base_model: ties works on task vectors"),
    ({"merge_method": "linear", "models": ["{ft0}", "{ft1}"], "parameters": {"weights": [1, 2, 3]}},
     "parameters.weights has 3 values for 2 models"),
    ({"merge_method": "linear", "models": ["{ft0}", "{ft1}/missing"]}, "models[1].model: folder not found"),
    ({"merge_method": "average", "models": ["{ft0}"]}, "merge_method: unknown merge method 'average'"),
])
def test_bad_recipes_exit_2_with_one_line(cli, zoo, tmp_path, capsys, data, expected):
    data["models"] = [m.format(**zoo) if isinstance(m, str) else m for m in data["models"]]
    recipe = write(tmp_path / "bad.yaml", data)
    assert cli(["merge", recipe, "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_recipe_file_and_missing_out(cli, tmp_path, capsys):
    assert cli(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert cli(["merge", str(tmp_path / "nope.yaml")]) == 2  # click usage error: --out is required


def test_the_dare_rescaling_in_use_is_printed(cli, zoo, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", {"merge_method": "dare_ties", "base_model": str(zoo["base"]),
                                         "models": [{"model": str(zoo["ft0"]), "parameters": {"density": 0.5}},
                                                    {"model": str(zoo["ft1"]), "parameters": {"density": 0.5}}]})
    assert cli(["merge", recipe, "--out", str(tmp_path / "out")]) == 0
    assert "note: dare_ties (combine: ties, normalize: False): rescale l1" in capsys.readouterr().err
    assert cli(["merge", recipe, "--out", str(tmp_path / "out"), "--overwrite", "-q"]) == 0
    assert "rescale" not in capsys.readouterr().err
