"""Names stay names: a preset or recipe name never resolves to a Python file outside configs/ (they are executed)."""

import os

import pytest

from llavaction_jax.cli import main
from llavaction_jax.config import CONFIGS_DIR, ConfigError, load_preset
from llavaction_jax.recipes import load_recipe

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\ndef get_config():\n    return None\n"


@pytest.fixture
def evil(tmp_path):
    """A Python file that leaves a marker when executed, and its path relative to configs/ (without .py)."""
    marker = tmp_path / "ran.txt"
    file = tmp_path / "x.py"
    file.write_text(EVIL.format(marker=str(marker)))
    return os.path.relpath(file.with_suffix(""), CONFIGS_DIR), marker


def test_a_preset_name_that_is_a_path_is_refused_without_running_it(evil):
    relative, marker = evil
    assert (CONFIGS_DIR / f"{relative}.py").is_file()  # what the old lookup would have executed
    with pytest.raises(ConfigError, match=r"unknown model preset .*; available: .*tiny"):
        load_preset(relative)
    with pytest.raises(ConfigError, match="unknown model preset 'train'"):  # a recipe is not a model preset
        load_preset("train")
    assert not marker.exists()
    assert load_preset("tiny").text.num_layers == 2


def test_a_recipe_name_that_is_a_path_is_refused_without_running_it(evil, capsys):
    relative, marker = evil
    with pytest.raises(ConfigError, match="neither an existing file nor one of the names"):
        load_recipe(relative)
    assert main(["train", "--config", relative]) == 2
    assert capsys.readouterr().err.startswith("train: error: config file")
    assert not marker.exists()
    assert load_recipe("train").train.steps == 100
    assert load_recipe(str(CONFIGS_DIR / "train.py")).train.steps == 100  # an explicit file path still works
