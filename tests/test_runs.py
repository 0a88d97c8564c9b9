"""The run folder: atomic files, checkpoints and their manifests, the lock, loading a run."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from vaekit.errors import ConfigError, RunError
from vaekit.runs import (
    RunLock,
    atomic_write_bytes,
    latest_checkpoint,
    list_checkpoints,
    load_run,
    verify_checkpoint,
    write_checkpoint,
    writing,
)


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_writing_turns_an_os_error_into_one_line_with_its_advice(tmp_path):
    import errno

    saved = ["nothing"]
    with pytest.raises(RunError) as caught:
        with writing("could not save step 3", tmp_path, lambda: f"{saved[0]} is saved"):
            saved[0] = "step 2"  # advice given as a function says what holds when it fails
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == f"could not save step 3: the disk holding {tmp_path} is full; " \
        "step 2 is saved"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with writing("cannot write", tmp_path, "never said"):  # no error: nothing happens
        (tmp_path / "ok").write_text("fine")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_checkpoints_verify_prune_and_skip_damage(tmp_path):
    for step in (10, 20, 30):
        write_checkpoint(tmp_path, step, {"a.bin": bytes([step]) * 10, "b.json": b"{}"}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 20]
    newest = tmp_path / "checkpoints" / "step-000000030"
    assert verify_checkpoint(newest) is None and latest_checkpoint(tmp_path) == newest
    (newest / "a.bin").write_bytes(b"tampered")
    warnings = []
    assert latest_checkpoint(tmp_path, warn=warnings.append).name == "step-000000020"
    assert "SHA-256" in warnings[0]
    (tmp_path / "checkpoints" / "step-000000020" / "MANIFEST.json").unlink()
    assert latest_checkpoint(tmp_path, warn=warnings.append) is None


def test_lock_refuses_a_second_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunError, match="in use"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass


def test_load_run_rebuilds_the_model(tiny_run):
    run = load_run(tiny_run)
    assert run.config.latent_dim == 4 and run.data["shape"] == [1, 8, 8]
    x = torch.rand(2, 1, 8, 8).round()
    assert run.model.encode(x).event_shape == (4,)


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


def test_load_run_errors(tiny_run, tmp_path):
    with pytest.raises(RunError, match="no such run folder"):
        load_run(tmp_path / "nothing")
    run = copy_run(tiny_run, tmp_path / "r1")
    (run / "model.safetensors").unlink()
    with pytest.raises(RunError, match="model.safetensors is missing"):
        load_run(run)

    run = copy_run(tiny_run, tmp_path / "r2")
    document = json.loads((run / "config.json").read_text())
    document["config"]["latent_dim"] = 5
    (run / "config.json").write_text(json.dumps(document))
    with pytest.raises(RunError, match="different runs"):
        load_run(run)

    run = copy_run(tiny_run, tmp_path / "r3")
    document["config"]["latent_dim"] = 4
    document["config"]["mystery"] = 1
    (run / "config.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError, match="'mystery', unknown to vaekit"):
        load_run(run)

    run = copy_run(tiny_run, tmp_path / "r4")
    (run / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_run(run)


class Exploit:
    def __reduce__(self):
        return (open, ("/tmp/vaekit-pwned-marker", "w"))


def test_a_pickle_in_place_of_weights_is_refused_unexecuted(tiny_run, tmp_path):
    marker = "/tmp/vaekit-pwned-marker"
    shutil.rmtree(marker, ignore_errors=True)
    run = copy_run(tiny_run, tmp_path / "r")
    (run / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(RunError, match="not a readable safetensors file"):
        load_run(run)
    import os

    assert not os.path.exists(marker)


def test_model_config_for_copies_every_model_option_of_the_training_config():
    from vaekit.config import TrainConfig
    from vaekit.model import ModelConfig
    from vaekit.runs import model_config_for

    config = TrainConfig(latent_dim=7, net="conv", hidden=[33, 11], conv_channels=[8, 16],
                         activation="tanh", prior="uniform", posterior="sigmoid-gaussian",
                         prior_components=4, likelihood="gaussian", gaussian_scale=0.3,
                         likelihood_components=3, conditional=True)
    model = model_config_for(config, (1, 8, 8), ["a", "b", "c"])
    for name in ModelConfig.model_fields():
        assert getattr(model, name) == getattr(config, name), name
    assert model.data_shape == (1, 8, 8) and model.num_classes == 3
    assert model.hidden is not config.hidden
