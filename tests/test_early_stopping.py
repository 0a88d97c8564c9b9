"""Early stopping on a validation split carved from the training split, and the small-table
preset that uses it (--validation-fraction, --patience)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vaekit.config import GENERIC_PRESET, SMALL_TABLE_PRESET, TrainConfig
from vaekit.dataset import validation_indices
from vaekit.errors import ConfigError
from vaekit.runs import latest_checkpoint, list_checkpoints, load_run, tensors_from_file
from vaekit.train import train

quiet = (lambda *a, **k: None)


def write_table(path: Path, rows: int = 60, seed: int = 0) -> Path:
    """A CSV of 4 correlated features on different scales and a text label."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, 1))
    x = np.hstack([z * 100 + 500, z * 0.01 + rng.normal(0, 0.005, (rows, 1)),
                   rng.normal(size=(rows, 1)), -z + rng.normal(0, 0.3, (rows, 1))])
    lines = ["area,smoothness,noise,negative,target"]
    lines += [",".join(f"{v:.6g}" for v in row) + ("," + ("big" if row[0] > 500 else "small"))
              for row in x]
    path.write_text("\n".join(lines) + "\n")
    return path


SMALL = dict(hidden=[64], latent_dim=3, batch_size=8, lr=1e-2, epochs=200, patience=3,
             progress=False, checkpoint_every_minutes=60.0, seed=2)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("early")
    table = write_table(folder / "table.csv")
    lines: list[str] = []
    run = train(TrainConfig(data=str(table), out=str(folder / "run"), keep_checkpoints=1000,
                            **SMALL), log=lines.append)
    return run, lines


def test_validation_rows_are_seeded_and_disjoint():
    kept, held = validation_indices(50, 0.2, split_seed=3)
    assert len(held) == 10 and len(kept) == 40
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(50))
    again, _ = validation_indices(50, 0.2, split_seed=3)
    other, _ = validation_indices(50, 0.2, split_seed=4)
    assert torch.equal(kept, again) and not torch.equal(kept, other)


def test_small_tables_get_the_early_stopping_preset():
    config = TrainConfig(data="table.csv").with_presets(455, "real")
    assert (config.epochs, config.patience, config.validation_fraction) == (
        SMALL_TABLE_PRESET["epochs"], SMALL_TABLE_PRESET["patience"], 0.2)
    assert TrainConfig(data="folder").with_presets(455, "image8").patience == 0
    big = TrainConfig(data="table.csv").with_presets(50_000, "real")
    assert big.epochs == GENERIC_PRESET["epochs"] and big.patience == 0
    assert TrainConfig(data="digits").with_presets(1438, "image8").patience == 0
    # what the user gave wins over the preset; --epochs N trains N epochs of the generic batch
    assert TrainConfig(data="t.csv", patience=0).with_presets(455, "real").patience == 0
    given = TrainConfig(data="t.csv", epochs=50).with_presets(455, "real")
    assert (given.epochs, given.batch_size, given.patience, given.validation_fraction) == (
        50, 128, 0, 0.0)
    asked = TrainConfig(data="t.csv", epochs=50, patience=5).with_presets(455, "real")
    assert (asked.patience, asked.validation_fraction) == (5, 0.2)
    with pytest.raises(ConfigError, match="--validation-fraction 0 holds no validation rows"):
        TrainConfig(patience=5, validation_fraction=0.0).validate()


def test_training_stops_after_patience_with_the_best_weights(stopped):
    run, lines = stopped
    rows = metrics(run)
    epochs, final = rows[:-1], rows[-1]
    state = final["early_stopping"]
    validation = [m["validation_elbo"] for m in epochs]
    best = int(np.argmax(validation)) + 1
    assert state["best_epoch"] == best == final["epoch"]
    assert state["best_validation_elbo"] == max(validation)
    assert state["reason"] == "patience" and len(epochs) == best + SMALL["patience"]
    assert state["validation_rows"] == 10  # a fifth of the 48 training rows of 60
    assert final["test_elbo"] == epochs[best - 1]["test_elbo"]
    # the run's weights are the best epoch's: the restored model scores its test ELBO
    loaded = load_run(run)
    weights = tensors_from_file(run / "model.safetensors")
    best_file = tensors_from_file(latest_checkpoint(run) / "best.safetensors")
    assert all(torch.equal(weights[k], best_file[k]) for k in weights)
    assert loaded.model is not None
    said = [line for line in lines if line.startswith("early stopping:")]
    assert len(said) == 1 and f"restored the weights of epoch {best}" in said[0]
    assert any("early stopping: 10 of the 48 training rows held out" in line for line in lines)


def test_a_stopped_run_is_finished_and_resume_says_so(stopped, tmp_path):
    run, _ = stopped
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    lines: list[str] = []
    train(resume=copy, log=lines.append)
    assert any("has finished: early stopping:" in line for line in lines)
    with pytest.raises(ConfigError, match="finished by early stopping"):
        train(resume=copy, overrides={"epochs": 500}, log=quiet)


def test_resume_before_the_stop_is_exact(stopped, tmp_path):
    """Resumed from a checkpoint after the best epoch but before the stop: the same stop, the
    same weights, the same records (best.safetensors carries the best epoch over)."""
    run, _ = stopped
    best = metrics(run)[-1]["early_stopping"]["best_epoch"]
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    steps_per_epoch = metrics(run)[0]["step"]
    keep = (best + 1) * steps_per_epoch  # one epoch after the best, before the stop
    for step, folder in list_checkpoints(copy):
        if step > keep:
            shutil.rmtree(folder)
    lines: list[str] = []
    train(resume=copy, log=lines.append)
    assert any(line.startswith(f"resumed from step {keep} (epoch {best + 2})") for line in lines)
    assert (copy / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    timing = {"train_seconds", "eval_seconds", "images_per_second"}
    strip = (lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows])
    assert strip(metrics(copy)) == strip(metrics(run))
