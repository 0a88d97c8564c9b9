"""`vaekit score` end to end: per-example scores of a linear-Gaussian run against its exact
log p(x), the out-of-distribution report, and bad input (one line, exit status 2)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import train_tiny

from vaekit.cli import main
from vaekit.oracle import exact_log_px, set_exact_posterior
from vaekit.runs import atomic_write_bytes, load_run, model_weights_bytes


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """A linear-Gaussian VAE (probabilistic PCA) trained briefly on real 5-D arrays."""
    folder = tmp_path_factory.mktemp("linear")
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(2, 5))
    data = rng.normal(size=(400, 2)) @ mixing + 0.3 * rng.normal(size=(400, 5)) + 2.0
    np.save(folder / "train.npy", data.astype(np.float32))
    new = rng.normal(size=(30, 2)) @ mixing + 0.3 * rng.normal(size=(30, 5)) + 2.0
    new[:5] += 4.0  # a few shifted examples
    np.save(folder / "new.npy", new.astype(np.float32))
    run_dir = train_tiny(folder / "run", data=str(folder / "train.npy"), hidden=[],
                         latent_dim=2, likelihood="gaussian", epochs=5, batch_size=32)
    # A few epochs leave the encoder far from the true posterior (importance weights with an
    # effective sample size of 1); start it from the exact posterior, slightly off, so that
    # the standard errors are honest.
    run = load_run(run_dir)
    set_exact_posterior(run.model)
    encoder = run.model.encoder.net[0]
    with torch.no_grad():
        encoder.weight.add_(0.02 * torch.randn(encoder.weight.shape,
                                               generator=torch.Generator().manual_seed(0)))
        encoder.bias[2:] += 0.4  # posterior scales a little too wide
    atomic_write_bytes(run_dir / "model.safetensors", model_weights_bytes(run.model))
    return run_dir, folder / "new.npy"


def test_cli_scores_equal_the_exact_log_px_of_a_linear_gaussian_run(linear_run, vaekit_cli,
                                                                     tmp_path):
    run_dir, new = linear_run
    out = tmp_path / "scores.csv"
    result = vaekit_cli("score", run_dir, "--data", new, "--out", out, "--k", "2000",
                        "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert len(rows) == 30 and rows[0]["set"] == "new"
    run = load_run(run_dir)
    raw = torch.from_numpy(np.load(new))
    x = run.pipeline.fixed(raw, 0)  # standardised as the training data
    exact = exact_log_px(run.model, x).numpy() + run.pipeline.log_jacobian  # original units
    log_px = np.array([float(r["log_px"]) for r in rows])
    se = np.array([float(r["log_px_se"]) for r in rows])
    ess = np.array([float(r["log_px_ess"]) for r in rows])
    assert (se > 0).all() and ess.min() > 100
    assert np.abs((log_px - exact) / se).max() < 4.5
    percentile = np.array([float(r["test_percentile"]) for r in rows])
    assert percentile[:5].max() < percentile[5:].mean()  # the shifted examples rank low
    assert rows[0]["bits_per_dim"] == ""  # a density: no bits per dimension
    assert {"z0", "z1", "elbo", "elbo_se", "kl", "reconstruction_error"} <= set(rows[0])
    assert "mean log p(x)" in result.stdout and "percentile" in result.stdout
    assert list(run_dir.glob("test-scores-k2000-seed0.safetensors"))


def test_cli_repeats_from_the_cache_with_the_same_numbers(tiny_run, capsys, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    command = ["score", str(run_dir), "--data", "digits", "--k", "20", "--json", "--no-progress"]
    assert main(command) == 0  # in-process, as the command runs it
    first = capsys.readouterr().out
    cache = run_dir / "test-scores-k20-seed0.safetensors"
    stamp = cache.stat().st_mtime_ns
    assert main(command) == 0
    assert cache.stat().st_mtime_ns == stamp  # read, not rewritten
    a, b = json.loads(first), json.loads(capsys.readouterr().out)
    assert a["log_px_mean"] == b["log_px_mean"] and a["n"] == b["n"] == a["n_test"]
    assert 0 < a["bits_per_dim_mean"] < 1 and 35 < a["percentile_median"] < 65
    assert (run_dir / "scores-digits.csv").is_file()


def test_ood_report_with_a_background_run(tiny_run, capsys, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    background = train_tiny(tmp_path / "background", perturb=0.2, epochs=2)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "noise.npy", rng.integers(0, 256, (150, 8, 8), dtype=np.uint8))
    assert main(["score", str(run_dir), "--data", "digits", "--against",
                 str(tmp_path / "noise.npy"), "--background", str(background), "--k", "20",
                 "--bootstrap", "100", "--typicality-batch", "4", "--no-progress"]) == 0
    assert "likelihood_ratio" in capsys.readouterr().out
    report = json.loads((run_dir / "ood-digits-vs-noise.json").read_text())
    names = [d["score"] for d in report["detections"]]
    assert names == ["likelihood", "typicality", "typicality_batch4", "complexity",
                     "likelihood_ratio"]
    by_name = {d["score"]: d for d in report["detections"]}
    assert by_name["likelihood"]["auroc"] > 0.95  # random pixels are nothing like digits
    for item in report["detections"]:
        for metric in ("auroc", "aupr", "fpr95"):
            low, high = item[f"{metric}_interval"]
            assert 0 <= low <= item[metric] <= high <= 1
    assert report["in"]["n"] == 359 and report["out"]["n"] == 150
    assert "skip_ratio" in report["not_computed"]  # one latent group
    assert report["background"]["perturb"] == 0.2
    page = (run_dir / "ood-digits-vs-noise.html").read_text()
    assert page.count("data:image/png;base64,") == 1 + len(names)  # ROC + one histogram each
    rows = read_csv(run_dir / "ood-digits-vs-noise.csv")
    assert {r["set"] for r in rows} == {"in", "out"} and len(rows) == 509
    assert "complexity" in rows[0] and "typicality_batch4" not in rows[0]


BAD = [
    (lambda tmp: ["--data", str(tmp / "wrong.npy")], "shape 1 x 9 x 9 but"),
    (lambda tmp: ["--data", str(tmp / "empty")], "no images found"),
    (lambda tmp: ["--data", str(tmp / "missing.npy")], "no such file or folder"),
    (lambda tmp: ["--data", "digits", "--background", str(tmp)], "add --against OUT"),
    (lambda tmp: ["--data", "digits", "--out", str(tmp / "scores.txt")], "must end in .csv"),
    (lambda tmp: ["--data", "digits", "--k", "1"], "--k must be at least 2"),
    (lambda tmp: ["--data", "digits", "--against", str(tmp / "empty")], "no images found"),
    (lambda tmp: ["--data", "digits", "--against", "digits", "--background", str(tmp / "lin")],
     "--background"),
    (lambda tmp: ["--data", "digits", "--against", str(tmp / "one.npy")], "too few"),
    (lambda tmp: ["--data", "digits", "--against", "digits", "--typicality-batch", "200"],
     "smaller --typicality-batch"),
    (lambda tmp: ["--data", "digits", "--against", "digits", "--bootstrap", "10000000"],
     "at most 100,000"),
]


@pytest.mark.parametrize("arguments,message", BAD, ids=[
    "wrong-shape", "empty-folder", "missing-file", "background-alone", "bad-output",
    "k-too-small", "empty-against", "background-other-data", "one-outlier",
    "typicality-batch-too-large", "bootstrap-too-large"])
def test_bad_input_gets_one_line_and_exit_status_2(tiny_run, capsys, tmp_path, arguments,
                                                   message):
    np.save(tmp_path / "wrong.npy", np.zeros((3, 9, 9), np.uint8))
    np.save(tmp_path / "one.npy", np.zeros((1, 8, 8), np.uint8))
    (tmp_path / "empty").mkdir()
    if "lin" in " ".join(arguments(tmp_path)):
        np.save(tmp_path / "real.npy", np.random.default_rng(0).normal(size=(40, 3)))
        train_tiny(tmp_path / "lin", data=str(tmp_path / "real.npy"), epochs=1, batch_size=16,
                   likelihood="gaussian")
    before = sorted(p.name for p in tiny_run.iterdir())
    given = arguments(tmp_path)
    # in-process, as the command runs it (vaekit.cli.main), to spare a Python start per case
    status = main(["score", str(tiny_run), *given, *([] if "--k" in given else ["--k", "20"]),
                   "--no-progress"])
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in captured.err
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # nothing written


def test_conditional_runs_are_refused(tmp_path, capsys):
    run = train_tiny(tmp_path / "cond", conditional=True, epochs=1)
    assert main(["score", str(run), "--data", "digits", "--k", "5", "--no-progress"]) == 2
    assert "is conditional" in capsys.readouterr().err


def test_ood_report_on_real_arrays_has_no_complexity_score(linear_run, tmp_path, capsys):
    run_dir, new = linear_run
    shifted = tmp_path / "shifted.npy"
    np.save(shifted, np.load(new) + 10.0)
    report = tmp_path / "report.html"
    status = main(["score", str(run_dir), "--data", str(new), "--against", str(shifted),
                   "--k", "50", "--bootstrap", "50", "--report", str(report), "--out",
                   str(tmp_path / "both.csv"), "--json", "--no-progress"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert [d["score"] for d in result["detections"]] == ["likelihood", "typicality"]
    assert "complexity" in result["not_computed"] and "likelihood_ratio" in result["not_computed"]
    assert result["detections"][0]["auroc"] > 0.95  # shifted by 10 in every dimension
    assert json.loads(report.with_suffix(".json").read_text()) == result


def test_a_hierarchical_run_adds_the_ratio_that_skips_its_lowest_group(tmp_path, capsys):
    """A run of two latent groups gets Havtorn et al.'s score ELBO - L^{>1} beside the others,
    in the JSON, the page and the CSV, equal to the estimator's difference of bounds on the same
    examples (the bounds themselves are checked against a closed form in test_oracle.py)."""
    from vaekit.estimate import skip_bounds_per_example
    from vaekit.ood_report import skip_ratios

    run_dir = train_tiny(tmp_path / "hierarchy", latent_groups=[2, 3], latent_dim=5, hidden=[32],
                         epochs=3)
    rng = np.random.default_rng(2)
    np.save(tmp_path / "noise.npy", rng.integers(0, 256, (60, 8, 8), dtype=np.uint8))
    assert main(["score", str(run_dir), "--data", "digits", "--against",
                 str(tmp_path / "noise.npy"), "--k", "16", "--bootstrap", "50",
                 "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((run_dir / "ood-digits-vs-noise.json").read_text())
    names = [d["score"] for d in report["detections"]]
    assert names[-1] == "skip_ratio_1" and "skip_ratio" not in report["not_computed"]
    assert "Havtorn" in report["detections"][-1]["description"]
    rows = read_csv(run_dir / "ood-digits-vs-noise.csv")
    ratios = np.array([float(r["skip_ratio_1"]) for r in rows])
    assert np.isfinite(ratios).all() and np.abs(ratios).max() > 1e-3
    run = load_run(run_dir)
    noise = torch.from_numpy(np.load(tmp_path / "noise.npy"))[:, None]  # (60, 1, 8, 8)
    from vaekit.scoring import data_key
    direct = skip_ratios(run, noise, data_key(noise), samples=16, seed=0)["skip_ratio_1"]
    bounds = skip_bounds_per_example(run.model, noise, run.pipeline, 16, split=data_key(noise))
    assert np.allclose(direct, (bounds[:, 0] - bounds[:, 1]).numpy())
    out_rows = [float(r["skip_ratio_1"]) for r in rows if r["set"] == "out"]
    assert np.allclose(out_rows, direct, atol=1e-6)
