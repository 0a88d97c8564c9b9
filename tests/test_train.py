"""The training loop: it learns, it is reproducible, and a resumed run is the same run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_tiny

from vaekit.errors import ConfigError, RunError
from vaekit.runs import latest_checkpoint, load_run, tensors_from_file


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return tensors_from_file(run / "model.safetensors")


def step_log(run):
    return tensors_from_file(latest_checkpoint(run) / "optimizer.safetensors")["step_log"]


def test_training_raises_the_test_elbo(tiny_run):
    rows = metrics(tiny_run)
    assert len(rows) == 3
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] + 1.0
    for row in rows:
        assert abs(row["test_elbo"] - (row["test_reconstruction"] - row["test_kl"])) < 1e-6
        assert row["test_kl"] >= 0 and row["images_per_second"] > 0


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a = train_tiny(tmp_path / "a", epochs=1)
    b = train_tiny(tmp_path / "b", epochs=1)
    c = train_tiny(tmp_path / "c", epochs=1, seed=1)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_at_an_epoch_boundary_is_bit_identical(tmp_path):
    whole = train_tiny(tmp_path / "whole", epochs=3)
    part = train_tiny(tmp_path / "part", epochs=1)
    from vaekit.train import train

    train(resume=part, overrides={"epochs": 3}, log=lambda *a: None)
    w1, w2 = weights(whole), weights(part)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(step_log(whole), step_log(part))
    assert [r["test_elbo"] for r in metrics(whole)] == [r["test_elbo"] for r in metrics(part)]


def test_resume_after_a_mid_epoch_stop_is_bit_identical(tmp_path):
    from vaekit.train import train

    whole = train_tiny(tmp_path / "whole", epochs=2, batch_size=16)
    part = train_tiny(tmp_path / "part", epochs=2, batch_size=16, time_limit=0.05)
    rows = metrics(part)
    assert rows and rows[-1]["complete"] is False  # stopped inside the first epochs
    train(resume=part, overrides={"time_limit": None}, log=lambda *a: None)
    w1, w2 = weights(whole), weights(part)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(step_log(whole), step_log(part))
    assert [r["epoch"] for r in metrics(part)] == [1, 2]


def test_resume_refuses_changes_that_alter_the_computation(tiny_run, tmp_path):
    import shutil

    from vaekit.train import train

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    with pytest.raises(ConfigError, match="--latent-dim cannot change when resuming"):
        train(resume=run, overrides={"latent_dim": 9})
    with pytest.raises(RunError, match="no such run folder"):
        train(resume=tmp_path / "missing")


def test_new_run_refuses_an_existing_folder(tiny_run):
    before = (tiny_run / "model.safetensors").read_bytes()
    with pytest.raises(RunError, match="already exists"):
        train_tiny(tiny_run)
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_conv_and_uniform_prior_runs_train(tiny_conv_run, tmp_path):
    assert metrics(tiny_conv_run)[-1]["test_elbo"] < 0
    run = train_tiny(tmp_path / "uniform", prior="uniform", epochs=2)
    rows = metrics(run)
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] - 1.0 and rows[-1]["test_kl"] > 0
    model = load_run(run).model
    z = model.prior.sample((50,))
    assert bool(((z >= 0) & (z <= 1)).all())


def test_gaussian_run_on_real_arrays(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(600, 2))
    x = latent @ rng.normal(size=(2, 6)) * 3 + 10 + 0.1 * rng.normal(size=(600, 6))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    run = train_tiny(tmp_path / "g", data=str(tmp_path / "x.npy"), epochs=4)
    rows = metrics(run)
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"]
    document = json.loads((run / "config.json").read_text())
    assert document["config"]["likelihood"] == "gaussian"
    assert document["pipeline"]["mode"] == "standardize"
    assert (run / "pipeline.safetensors").is_file()


def test_learning_rate_decays_per_epoch_and_resumes_exactly(tmp_path):
    from vaekit.train import train

    whole = train_tiny(tmp_path / "whole", epochs=3, lr=2e-3, lr_decay=0.5)
    assert [r["lr"] for r in metrics(whole)] == pytest.approx([2e-3, 1e-3, 5e-4])
    part = train_tiny(tmp_path / "part", epochs=1, lr=2e-3, lr_decay=0.5)
    train(resume=part, overrides={"epochs": 3}, log=lambda *a: None)
    w1, w2 = weights(whole), weights(part)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    constant = train_tiny(tmp_path / "constant", epochs=3, lr=2e-3)
    assert not torch.equal(weights(constant)["encoder.net.0.weight"], w1["encoder.net.0.weight"])
