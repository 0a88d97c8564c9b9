"""Sample quality in the reports: the evaluate table's section and the explain section."""

from __future__ import annotations

import json
import shutil

from vaekit.report import evaluation_table, explain
from vaekit.runs import load_run, load_run_dataset
from vaekit.sample_quality import evaluate_sample_quality


def test_explain_shows_samples_with_their_nearest_training_images_and_the_scores(
        tiny_run, tmp_path, feature_cache, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(feature_cache))
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    run = load_run(run_dir)
    dataset = load_run_dataset(run)
    quiet = dict(seed=0, examples=3, k=4, gradient_examples=2, gradient_samples=(1, 2),
                 gradient_repeats=3, refit_steps=5, log=lambda message: None)
    page = explain(run, dataset, **quiet).read_text()
    assert 'id="samples"' in page and "nearest training images" in page
    assert "vaekit evaluate RUN_DIR --sample-quality" in page  # no scores yet: says how
    assert (run_dir / "explain-samples.png").is_file()
    quality = evaluate_sample_quality(run, dataset, samples=100, bootstrap=20)
    (run_dir / "evaluation.json").write_text(json.dumps({"sample_quality": quality}))
    page = explain(run, dataset, **quiet).read_text()
    assert "floor: real test" in page and "Frechet dist." in page


def test_the_evaluate_table_has_a_row_per_temperature_and_pixel_kind(
        tiny_run, feature_cache, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(feature_cache))
    run = load_run(tiny_run)
    quality = evaluate_sample_quality(run, load_run_dataset(run), samples=50,
                                      temperatures=(1.0, 0.8), bootstrap=10)
    from vaekit.sample_report import sample_quality_table

    text = sample_quality_table(quality)
    for label in ("floor: real test, n = 50", "floor: real test as the model sees",
                  "T = 1  E[x|z]", "T = 1  x ~ p(x|z)", "T = 0.8  E[x|z]", "T = 0.8  x ~ p(x|z)"):
        assert label in text, label
    assert "classifier trained by vaekit on digits" in text
    result = {"run": "r", "split": "test", "n": 5, "seed": 0, "seconds": 1.0, "device": "cpu",
              "likelihood_of": "x", "k": 2, "log_px": -1.0, "log_px_se": 0.1, "log_px_ess": 1.5,
              "elbo": -2.0, "elbo_se": 0.1, "reconstruction": -1.0, "reconstruction_se": 0.1,
              "kl": 1.0, "kl_exact": True, "elbo_gap": 1.0, "elbo_gap_se": 0.1,
              "active_units": 1, "latent_dim": 4, "kl_per_dim": [0.1] * 4,
              "sample_quality": quality}
    assert text in evaluation_table(result)
