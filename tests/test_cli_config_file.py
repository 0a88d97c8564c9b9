"""`vaekit train --config FILE`: training options from a JSON file, and the recipes/ folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vaekit.config import TrainConfig, options_from_file
from vaekit.errors import ConfigError

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.json"))


def test_a_config_file_sets_options_and_the_command_line_overrides_it(vaekit_cli, tmp_path):
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"epochs": 3, "latent_groups": [2, 3], "hidden": [32],
                                   "seed": 4}))
    run = tmp_path / "run"
    result = vaekit_cli("train", "--config", options, "--epochs", "1", "--no-progress",
                        "--out", run)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["epochs"] == 1  # the command line wins
    assert config["latent_groups"] == [2, 3] and config["seed"] == 4 and config["hidden"] == [32]


@pytest.mark.parametrize("content,words", [
    ('{"epoch": 3}', "'epoch', which is not a training option; did you mean 'epochs'?"),
    ('[1, 2]', "must be a JSON object of training options"),
    ('{"epochs": "3"}', "'epochs' must be an integer"),
    ('{"epochs": 3', "not valid JSON"),
    ('{"prior": "gamma"}', "--prior"),
])
def test_bad_config_files_are_refused_in_one_line(vaekit_cli, tmp_path, content, words):
    options = tmp_path / "options.json"
    options.write_text(content)
    result = vaekit_cli("train", "--config", options, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_a_config_file_cannot_change_a_resumed_run(vaekit_cli, tmp_path, tiny_run):
    options = tmp_path / "options.json"
    options.write_text('{"epochs": 5}')
    result = vaekit_cli("train", "--config", options, "--resume", tiny_run)
    assert result.returncode == 2 and "--config starts a new run" in result.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_recipe_is_a_valid_set_of_options(recipe):
    values = json.loads(recipe.read_text())
    TrainConfig(**options_from_file(values, str(recipe))).validate()


def test_there_are_recipes():
    assert len(RECIPES) >= 3


def test_options_from_file_checks_types_as_config_json_does():
    with pytest.raises(ConfigError, match="'latent_groups' must be a list of integers"):
        options_from_file({"latent_groups": [1.5]}, "f.json")
