"""The richer posteriors from the command line: train, evaluate, steer, sample, resume."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("posterior", ["full-covariance", "iaf"])
def test_a_richer_posterior_trains_evaluates_and_steers(vaekit_cli, tmp_path, posterior):
    run = tmp_path / "run"
    extra = ["--flow-steps", "3"] if posterior == "iaf" else []
    result = vaekit_cli("train", "--posterior", posterior, *extra, "--epochs", "2",
                        "--latent-dim", "4", "--hidden", "64", "--no-progress", "--out", run)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["posterior"] == posterior
    assert config["flow_steps"] == (3 if posterior == "iaf" else None)

    result = vaekit_cli("evaluate", run, "--k", "64", "--limit", "40")
    assert result.returncode == 0, result.stderr
    assert "KL per latent dimension: not defined" in result.stdout
    evaluation = json.loads((run / "evaluation.json").read_text())
    # the importance-sampled bound is at least the ELBO from the same draws
    assert evaluation["log_px"] >= evaluation["elbo"]

    result = vaekit_cli("traverse", run, "--out", tmp_path / "t.png")
    assert result.returncode == 0, result.stderr
    assert "rows by mean KL per dimension" in result.stdout
    for command in (("sample", run, "-n", "4", "--out", tmp_path / "s.png"),
                    ("reconstruct", run, "--out", tmp_path / "r.png"),
                    ("embed", run, "--out", tmp_path / "e.png")):
        result = vaekit_cli(*command)
        assert result.returncode == 0, result.stderr

    result = vaekit_cli("train", "--resume", run, "--epochs", "3", "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3


def test_per_dimension_free_bits_are_refused_for_a_posterior_that_does_not_factorise(
        vaekit_cli, tmp_path):
    result = vaekit_cli("train", "--posterior", "iaf", "--free-bits", "0.1", "--out",
                        tmp_path / "run")
    assert result.returncode == 2
    assert "--free-bits per group needs a --posterior that factorises" in result.stderr
    assert not (tmp_path / "run").exists()
