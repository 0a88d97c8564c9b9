"""vaekit train --tensorboard (tensorboard_log.py), read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import run_vaekit, train_tiny
from vaekit.runs import read_metrics

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from vaekit.tensorboard_log import STEP_EVERY  # noqa: E402


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0,
                                                               "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_the_stream_holds_what_metrics_jsonl_says(tmp_path):
    run_dir = train_tiny(tmp_path / "run", epochs=2, tensorboard="", latent_groups=[2, 4],
                         latent_dim=6)
    assert json.loads((run_dir / "config.json").read_text())["config"]["tensorboard"] == ""
    accumulator = events(run_dir / "tensorboard")
    values = scalars(accumulator)
    metrics = read_metrics(run_dir)
    steps = [m["step"] for m in metrics]
    for key in ("test_elbo", "test_kl", "train_elbo", "lr", "images_per_second", "beta"):
        assert values[f"epoch/{key}"] == [(m["step"], pytest.approx(m[key], rel=1e-6))
                                          for m in metrics]
    # step scalars: one point per STEP_EVERY steps, each the mean of its window
    assert [s for s, _ in values["train/elbo"]] == list(range(STEP_EVERY, steps[-1] + 1,
                                                              STEP_EVERY))
    for s, elbo in values["train/elbo"]:
        rec = dict(values["train/reconstruction"])[s]
        assert elbo == pytest.approx(rec - dict(values["train/kl"])[s], abs=1e-3)
    # the KL of each group of the hierarchy, and of each of its dimensions, every epoch
    assert {"kl_per_group/z1", "kl_per_group/z2"} <= set(values)
    assert sum(t.startswith("kl_per_dimension/") for t in values) == 6
    total = sum(dict(values[f"kl_per_group/z{g}"])[steps[-1]] for g in (1, 2))
    dims = sum(dict(values[t])[steps[-1]] for t in values if t.startswith("kl_per_dimension/"))
    assert dims == pytest.approx(total, rel=1e-4)
    for name in ("samples", "reconstructions"):
        assert [e.step for e in accumulator.Images(f"images/{name}")] == steps
    assert values["hparams/test_elbo"] == [(steps[-1], pytest.approx(metrics[-1]["test_elbo"]))]
    # the HParams view's session records: the experiment and the run's options
    plugin = accumulator.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(plugin)
    assert b"latent_groups" in plugin["_hparams_/session_start_info"]


def test_resume_continues_the_stream_without_duplicated_steps(tmp_path):
    whole = train_tiny(tmp_path / "whole", epochs=3, tensorboard="")
    # a run stopped mid-epoch (a checkpoint every 7 steps, a kill after the last one), resumed
    options = dict(epochs=3, tensorboard="", checkpoint_every_steps=7)
    part = train_tiny(tmp_path / "part", **{**options, "epochs": 2})
    # what a kill after the last checkpoint leaves: events beyond it, not in any checkpoint
    checkpoints = sorted((part / "checkpoints").iterdir())
    shutil.rmtree(checkpoints[-1])  # back to an earlier, mid-epoch checkpoint
    result = run_vaekit("train", "--resume", part, "--epochs", "3", "--no-progress")
    assert result.returncode == 0, result.stderr
    resumed = scalars(events(part / "tensorboard"))
    reference = scalars(events(whole / "tensorboard"))
    timing = ("epoch/images_per_second", "epoch/train_seconds", "epoch/eval_seconds",
              "hparams/train_seconds")
    assert set(resumed) == set(reference)
    for tag, points in reference.items():
        steps = [s for s, _ in resumed[tag]]
        assert steps == sorted(set(steps)), tag  # each step once, in order
        assert steps == [s for s, _ in points], tag
        if tag not in timing:  # exact resume: the same numbers
            assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in points],
                                                                 rel=1e-5), tag


def test_off_costs_nothing_and_a_missing_package_is_one_line(tmp_path):
    code = ("import sys; from vaekit.config import TrainConfig; from vaekit.train import train;"
            f"train(TrainConfig(epochs=1, hidden=[16], latent_dim=2, progress=False, "
            f"out={str(tmp_path / 'off')!r}), log=lambda *a: None);"
            "print('tensorboard' in sys.modules, 'vaekit.tensorboard_log' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "False"]
    assert not (tmp_path / "off" / "tensorboard").exists()
    # TensorBoard absent: a path on sys.path that shadows it with a failing import
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    result = run_vaekit("train", "--epochs", "1", "--out", tmp_path / "refused",
                        "--tensorboard", env={"PYTHONPATH": f"{shadow.parent}:"
                                              f"{sys.path[0] if sys.path[0] else ''}"
                                              + ":" + ":".join(p for p in sys.path if p)})
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "pip install 'vaekit[tensorboard]'" in line
    assert not (tmp_path / "refused").exists()


def test_the_option_takes_a_folder_and_may_change_on_resume(tmp_path):
    chosen = tmp_path / "logs"
    result = run_vaekit("train", "--epochs", "1", "--hidden", "16", "--latent-dim", "2",
                        "--out", tmp_path / "run", "--tensorboard", chosen, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert list(chosen.glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "tensorboard").exists()
    result = run_vaekit("train", "--resume", tmp_path / "run", "--epochs", "2", "--tensorboard",
                        "--no-progress")
    assert result.returncode == 0, result.stderr
    epochs = scalars(events(tmp_path / "run" / "tensorboard"))["epoch/test_elbo"]
    assert [s for s, _ in epochs] == [read_metrics(tmp_path / "run")[-1]["step"]]
