"""Sample quality on real data (the digits): the scores behave as they must, and the command.

Every tolerance is an interval the scores report themselves: a change counts when it exceeds
twice the standard errors of the two figures compared (each read off its 95 % interval)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_vaekit, train_tiny
from vaekit.data import load_dataset
from vaekit.features import data_units, features_for
from vaekit.runs import load_run, load_run_dataset
from vaekit.sample_metrics import Reference, score_samples
from vaekit.sample_quality import evaluate_sample_quality, reference_indices

LOWER_IS_BETTER = ("frechet_distance", "kid")


def se(score: dict) -> float:
    return (score["high"] - score["low"]) / (2 * 1.96)


def clearly_better(name: str, better: dict, worse: dict) -> bool:
    gap = worse[name]["value"] - better[name]["value"]
    if name not in LOWER_IS_BETTER:
        gap = -gap
    return gap > 2 * math.hypot(se(better[name]), se(worse[name]))


@pytest.fixture(scope="module")
def digits_scoring(feature_cache):
    """The digits, their feature network, the training reference and a scorer of images."""
    import os

    saved = os.environ.get("VAEKIT_CACHE")
    os.environ["VAEKIT_CACHE"] = str(feature_cache)
    try:
        dataset = load_dataset("digits")
        features = features_for(dataset)
    finally:
        if saved is None:
            os.environ.pop("VAEKIT_CACHE")
        else:
            os.environ["VAEKIT_CACHE"] = saved
    reference = Reference.of(features(data_units(dataset, dataset.train_x)))

    def score(images):
        return score_samples(features(images), reference, bootstrap=100)

    return dataset, data_units(dataset, dataset.test_x), score, features


def blur(images, sigma: float):
    radius = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-radius ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate"),
                    (kernel[:, None] * kernel[None, :])[None, None])


@pytest.mark.parametrize("damage, levels", [("noise", (0.1, 0.2, 0.4)),
                                            ("blur", (0.4, 0.5, 0.6))])
def test_real_test_images_score_best_and_worse_with_more_damage(digits_scoring, damage, levels):
    _, test, score, _ = digits_scoring
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(0))
    versions = [test] + [(test + level * noise).clamp(0, 1) if damage == "noise"
                         else blur(test, level) for level in levels]
    scores = [score(images) for images in versions]
    for name in ("frechet_distance", "kid", "precision", "density", "coverage"):
        for better, worse in zip(scores, scores[1:]):
            assert clearly_better(name, better, worse), (name, damage)
    # recall falls slowly under light noise (noisy images still sit between the reals)
    assert clearly_better("recall", scores[0], scores[-1])


def test_dropping_classes_lowers_recall_and_coverage_not_precision(digits_scoring):
    """Coverage is meant for as many samples as reference examples (Naeem et al. 2020): half the
    training images are the reference here, and the samples come from the other half and the
    test set, all classes or only 0-4, 500 either way."""
    dataset, test, _, features = digits_scoring
    train = data_units(dataset, dataset.train_x)
    reference = Reference.of(features(train[0::2]))
    pool = torch.cat([train[1::2], test])
    pool_labels = torch.cat([dataset.train_y[1::2], dataset.test_y])
    generator = torch.Generator().manual_seed(1)
    every_class = pool[torch.randperm(len(pool), generator=generator)[:500]]
    low_classes = pool[pool_labels < 5]
    dropped = low_classes[torch.randperm(len(low_classes), generator=generator)[:500]]
    every_class, dropped = (score_samples(features(x), reference, bootstrap=100)
                            for x in (every_class, dropped))
    assert clearly_better("recall", every_class, dropped)
    assert clearly_better("coverage", every_class, dropped)
    assert not clearly_better("precision", every_class, dropped)


def test_duplicated_training_images_raise_precision_not_coverage(digits_scoring):
    dataset, test, score, _ = digits_scoring
    n = 180
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(2))
    fresh = score(test[order[:n]])
    train = data_units(dataset, dataset.train_x)
    copies = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:n // 4]]
    memorised = score(copies.repeat(4, 1, 1, 1))  # 45 training images, 4 copies each
    assert memorised["precision"]["value"] == 1.0
    assert clearly_better("precision", memorised, fresh)
    assert clearly_better("coverage", fresh, memorised)


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory, feature_cache):
    return train_tiny(tmp_path_factory.mktemp("quality") / "run", epochs=6)


def _evaluate(run_dir, feature_cache, monkeypatch, **options):
    monkeypatch.setenv("VAEKIT_CACHE", str(feature_cache))
    run = load_run(run_dir)
    return evaluate_sample_quality(run, load_run_dataset(run), **options)


def test_model_samples_score_below_the_floor_with_both_pixel_kinds(quality_run, feature_cache,
                                                                    monkeypatch):
    result = _evaluate(quality_run, feature_cache, monkeypatch, temperatures=(1.0, 0.5),
                       bootstrap=50)
    assert result["samples"] == 359 and result["reference"]["n"] == 1438  # the test set's size
    assert [(row["temperature"], row["pixels"]) for row in result["scores"]] == \
        [(1.0, "mean"), (1.0, "sampled"), (0.5, "mean"), (0.5, "sampled")]
    assert result["floor"]["sampled"]["n"] == 359
    for row in result["scores"]:
        floor = result["floor"][row["pixels"]]
        assert clearly_better("frechet_distance", floor, row)
        assert clearly_better("kid", floor, row)
        assert row["n"] == 359
        assert ("E[x|z]" if row["pixels"] == "mean" else "x ~ p(x|z)") in row["scored"]
    assert result["features"]["kind"] == "classifier"
    json.dumps(result, allow_nan=False)  # a JSON object as it is


def test_scores_are_deterministic_for_the_same_run_seed_and_count(quality_run, feature_cache,
                                                                  monkeypatch):
    first = _evaluate(quality_run, feature_cache, monkeypatch, samples=200, bootstrap=20)
    second = _evaluate(quality_run, feature_cache, monkeypatch, samples=200, bootstrap=20)
    other = _evaluate(quality_run, feature_cache, monkeypatch, samples=200, bootstrap=20, seed=1)
    for result in (first, second, other):
        result.pop("seconds")
    assert first == second
    assert first["scores"] != other["scores"]


def test_the_reference_and_floor_are_cached_per_data_and_pipeline(quality_run, feature_cache,
                                                                  monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(feature_cache, cache)
    for leftover in (cache / "features").glob("*-reference-*"):  # other tests' references
        leftover.unlink()
    first = _evaluate(quality_run, cache, monkeypatch, samples=120, bootstrap=20)
    files = list((cache / "features").glob("*-reference-*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(b"damaged")  # a derived file: recomputed, not an error
    second = _evaluate(quality_run, cache, monkeypatch, samples=120, bootstrap=20)
    third = _evaluate(quality_run, cache, monkeypatch, samples=120, bootstrap=20)  # from cache
    for result in (first, second, third):
        result.pop("seconds")
    assert first == second == third
    _evaluate(quality_run, cache, monkeypatch, samples=150, bootstrap=20)  # another floor count
    assert len(list((cache / "features").glob("*-reference-*.safetensors"))) == 2


def test_the_command_checks_the_same_sample_limit_as_the_library():
    from vaekit.cli import MAX_QUALITY_SAMPLES
    from vaekit.sample_quality import MAX_SAMPLES

    assert MAX_QUALITY_SAMPLES == MAX_SAMPLES


def test_the_reference_is_the_same_seeded_subset_for_every_run():
    dataset = load_dataset("digits")
    assert torch.equal(reference_indices(dataset), torch.arange(len(dataset.train_x)))
    picked = reference_indices(dataset, size=100)
    assert torch.equal(picked, reference_indices(dataset, size=100)) and len(picked) == 100
    assert bool((picked[1:] > picked[:-1]).all())


def test_conditional_runs_report_the_share_of_the_requested_class(tmp_path_factory,
                                                                  feature_cache, monkeypatch):
    run_dir = train_tiny(tmp_path_factory.mktemp("quality") / "conditional", conditional=True,
                         epochs=15)
    result = _evaluate(run_dir, feature_cache, monkeypatch, samples=300, bootstrap=20)
    assert result["conditional"]
    floor = result["floor"]["mean"]["class_agreement"]
    assert floor["share"] > 0.95  # the classifier on real test images: its accuracy
    for row in result["scores"]:
        share = row["class_agreement"]
        assert share["n"] == 300
        # the class was requested of the model: far more often right than chance (10 %)
        assert share["share"] > 0.1 + 5 * math.sqrt(0.1 * 0.9 / 300)
    from vaekit.sample_report import sample_quality_table

    text = sample_quality_table(result)
    assert "right class" in text
    assert f"{100 * result['scores'][0]['class_agreement']['share']:.1f} %" in text


def test_evaluate_command_writes_the_sample_quality_object(quality_run, tmp_path, feature_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(quality_run, run_dir)
    env = {"VAEKIT_CACHE": str(feature_cache)}
    done = run_vaekit("evaluate", run_dir, "--k", "5", "--limit", "20", "--sample-quality",
                      "--samples", "100", "--temperatures", "1,0.7", "--bootstrap", "20",
                      "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    assert "sample quality: 100 samples" in done.stdout and "floor: real test" in done.stdout
    written = json.loads((run_dir / "evaluation.json").read_text())
    quality = written["sample_quality"]
    assert quality["samples"] == 100 and quality["temperatures"] == [1.0, 0.7]
    assert len(quality["scores"]) == 4 and "log_px" in written
    for args, message in ((("--samples", "100"), "--samples belongs to --sample-quality"),
                          (("--sample-quality", "--samples", "5"), "give 10 to"),
                          (("--sample-quality", "--temperatures", "-1"), "temperatures are"),
                          (("--sample-quality", "--bootstrap", "3"), "--bootstrap 3")):
        before = (run_dir / "evaluation.json").read_bytes()
        bad = run_vaekit("evaluate", run_dir, "--k", "5", "--limit", "20", *args, env=env)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
        assert (run_dir / "evaluation.json").read_bytes() == before


def test_sample_command_draws_at_a_temperature(tiny_run, tmp_path):
    import numpy as np

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    done = run_vaekit("sample", run_dir, "-n", "4", "--temperature", "0",
                      "--save-array", tmp_path / "centre.npy")
    assert done.returncode == 0, done.stderr
    assert "at temperature 0" in done.stdout
    assert (run_dir / "samples-4-t0-seed0.png").is_file()  # beside, not over, the T = 1 file
    centre = np.load(tmp_path / "centre.npy")
    assert np.array_equal(centre, np.repeat(centre[:1], 4, axis=0))  # T = 0: every z is 0
    bad = run_vaekit("sample", run_dir, "--temperature", "-1")
    assert bad.returncode == 2 and "--temperature -1" in bad.stderr
