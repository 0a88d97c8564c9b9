"""What vaekit says in the first hour: options the data never read, dataset names in any case,
a run still being trained, and tabular runs' class names and pictures."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from conftest import run_vaekit
from test_early_stopping import write_table
from vaekit.config import TrainConfig
from vaekit.data import load_dataset
from vaekit.runs import RunLock
from vaekit.train import train


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("table")
    lines: list[str] = []
    run = train(TrainConfig(data=str(write_table(folder / "table.csv")), out=str(folder / "run"),
                            epochs=2, patience=0, hidden=[16], latent_dim=2, batch_size=8,
                            image_size=32, conv_channels=[8], binarize="fixed",
                            conditional=True, progress=False), log=lines.append)
    return run, lines


def test_options_the_data_never_read_warn_once_each(table_run):
    _, lines = table_run
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 3
    assert "--image-size applies to image folders, cifar10, celeba; a CSV table does not read " \
        "it, so it is ignored" in warnings[0]
    assert "--conv-channels applies to --net conv" in warnings[1]
    assert "--binarize applies to the Bernoulli likelihood" in warnings[2]


def test_tabular_runs_keep_class_names_and_feature_names(table_run, tmp_path):
    run, _ = table_run
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["label_names"] == ["big", "small"]
    assert data["feature_names"] == ["area", "smoothness", "noise", "negative"]
    result = run_vaekit("sample", run, "--label", "BIG", "-n", "4", "--out", tmp_path / "s.png")
    assert result.returncode == 0, result.stderr
    assert "y = big (class 0)" in result.stdout
    result = run_vaekit("reconstruct", run, "-n", "8", "--out", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    picture = Image.open(tmp_path / "r.png")
    # a block of 8 inputs and one of 8 reconstructions (14-pixel rows), the feature names above
    # and the colour bar below
    assert picture.height > 2 * 8 * 14 + 62 + 40


def test_dataset_names_match_in_any_case():
    assert TrainConfig(data="MNIST").validate().data == "mnist"
    assert TrainConfig(data="Fashion-MNIST").validate().data == "fashion-mnist"
    assert load_dataset("Digits").name == "digits"


def test_a_run_being_trained_names_its_process(table_run, tmp_path):
    run, _ = table_run
    copy = shutil.copytree(run, tmp_path / "run")
    with RunLock(copy):
        result = run_vaekit("sample", copy, "-n", "2", "--out", tmp_path / "s.png",
                            "--label", "0")
        assert result.returncode == 0, result.stderr
        assert f"still being trained by vaekit process {os.getpid()}; using the weights saved " \
            "after epoch 2" in result.stderr
        (copy / "model.safetensors").unlink()
        result = run_vaekit("evaluate", copy)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"is being trained by vaekit process {os.getpid()} and has not finished its first " \
        "epoch" in result.stderr
    assert "--resume" not in result.stderr
