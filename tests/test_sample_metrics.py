"""Sample-quality arithmetic against libraries (prdc, scipy) and its bootstrap against theory."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from vaekit.sample_metrics import (
    Reference,
    frechet_distance,
    nearest_neighbour_radii,
    score_samples,
)

prdc = pytest.importorskip("prdc")
scipy_linalg = pytest.importorskip("scipy.linalg")


def gaussian_features(n: int, dims: int, seed: int, shift: float = 0.0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dims)) * scale + shift


@pytest.mark.parametrize("seed, n_real, n_fake, dims, shift, scale", [
    (0, 500, 400, 8, 0.0, 1.0),
    (1, 300, 700, 16, 0.4, 1.3),
    (2, 800, 200, 4, -0.2, 0.7),
])
def test_precision_recall_density_coverage_equal_prdc(seed, n_real, n_fake, dims, shift, scale):
    real = gaussian_features(n_real, dims, seed)
    fake = gaussian_features(n_fake, dims, seed + 100, shift, scale)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the counts
        expected = prdc.compute_prdc(real, fake, nearest_k=3)
    ours = score_samples(torch.tensor(fake), Reference.of(torch.tensor(real)), bootstrap=10)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name]["value"] == pytest.approx(float(expected[name]), abs=1e-12), name


def test_nearest_neighbour_radii_equal_prdc():
    features = gaussian_features(300, 5, 3)
    expected = prdc.prdc.compute_nearest_neighbour_distances(features, 3)
    ours = nearest_neighbour_radii(torch.tensor(features), 3).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5)  # float32 distances


@pytest.mark.parametrize("seed, dims", [(0, 6), (1, 32)])
def test_frechet_distance_equals_scipy_sqrtm(seed, dims):
    real = gaussian_features(600, dims, seed)
    fake = gaussian_features(500, dims, seed + 1, 0.3, 1.2) @ \
        np.random.default_rng(seed).normal(size=(dims, dims)) / math.sqrt(dims)  # correlated
    mean_a, mean_b = fake.mean(0), real.mean(0)
    cov_a, cov_b = np.cov(fake.T), np.cov(real.T)
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(
        cov_a + cov_b - 2 * scipy_linalg.sqrtm(cov_a @ cov_b).real)
    ours = frechet_distance(torch.tensor(fake), Reference.of(torch.tensor(real)))
    assert ours == pytest.approx(expected, rel=1e-8)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    real = gaussian_features(400, 10, 4)
    fake = gaussian_features(300, 10, 5, 0.2)

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    k_ff, k_rr, k_fr = kernel(fake, fake), kernel(real, real), kernel(fake, real)
    n, m = len(fake), len(real)
    expected = (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1)) \
        + (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1)) - 2 * k_fr.mean()
    ours = score_samples(torch.tensor(fake), Reference.of(torch.tensor(real)), bootstrap=10)
    assert ours["kid"]["value"] == pytest.approx(expected, rel=1e-7)  # float32 kernel values


def test_identical_distributions_score_near_zero_distance_and_full_overlap():
    reference = Reference.of(torch.tensor(gaussian_features(1500, 8, 6)))
    same = score_samples(torch.tensor(gaussian_features(1500, 8, 7)), reference)
    shifted = score_samples(torch.tensor(gaussian_features(1500, 8, 7, shift=1.0)), reference)
    kid = same["kid"]
    assert abs(kid["value"]) < 3 * kid["se"] + 1e-3  # unbiased: zero within its error
    assert same["frechet_distance"]["value"] < 0.1 < shifted["frechet_distance"]["value"]
    for name in ("precision", "recall", "coverage"):
        assert same[name]["value"] > shifted[name]["value"] + 0.1, name


def test_precision_and_coverage_intervals_have_binomial_widths():
    """Precision averages per-sample indicators (resampled over the N samples) and coverage
    per-reference ones (over the R reals): their 95 % intervals must be about 2 x 1.96 binomial
    standard errors wide. A tolerance of 25 % covers the bootstrap's own noise at B = 400."""
    reference = Reference.of(torch.tensor(gaussian_features(1200, 6, 8)))
    scores = score_samples(torch.tensor(gaussian_features(900, 6, 9, 0.5, 1.2)), reference,
                           bootstrap=400)
    for name, count in (("precision", 900), ("coverage", 1200)):
        p = scores[name]["value"]
        expected = 2 * 1.96 * math.sqrt(p * (1 - p) / count)
        width = scores[name]["high"] - scores[name]["low"]
        assert width == pytest.approx(expected, rel=0.25), name
        assert scores[name]["low"] <= p <= scores[name]["high"]


def test_kid_standard_error_matches_the_spread_over_independent_sample_sets():
    """The bootstrap s.e. of KID against the sd of KID over 24 independent sets of samples.
    With 24 sets the sd itself has a relative s.e. of about 1 / sqrt(2 * 23) = 15 %: the ratio
    must lie within 0.55 ... 1.6 (3 of those s.e. and the bootstrap's own noise)."""
    reference = Reference.of(torch.tensor(gaussian_features(800, 6, 10)))
    values, errors = [], []
    for seed in range(24):
        scores = score_samples(torch.tensor(gaussian_features(300, 6, 100 + seed, 0.3)),
                               reference, bootstrap=100, seed=seed)
        values.append(scores["kid"]["value"])
        errors.append(scores["kid"]["se"])
    ratio = float(np.mean(errors)) / float(np.std(values, ddof=1))
    assert 0.55 < ratio < 1.6


def test_intervals_shrink_as_the_sample_count_grows():
    reference = Reference.of(torch.tensor(gaussian_features(2000, 8, 11)))
    widths = {}
    for n in (300, 1200):
        scores = score_samples(torch.tensor(gaussian_features(n, 8, 12, 0.3, 1.1)), reference,
                               bootstrap=200)
        widths[n] = {name: scores[name]["high"] - scores[name]["low"]
                     for name in ("frechet_distance", "kid", "precision", "density")}
    for name in widths[300]:
        # 4 x the samples: half the width in theory; 0.75 leaves room for bootstrap noise
        assert widths[1200][name] < 0.75 * widths[300][name], name


def test_scores_are_deterministic_for_a_seed():
    reference = Reference.of(torch.tensor(gaussian_features(400, 5, 13)))
    fake = torch.tensor(gaussian_features(300, 5, 14, 0.2))
    first = score_samples(fake, reference, seed=3)
    assert score_samples(fake, reference, seed=3) == first
    assert score_samples(fake, reference, seed=4)["kid"] != first["kid"]


def test_bad_inputs_are_refused():
    reference = Reference.of(torch.tensor(gaussian_features(100, 5, 15)))
    with pytest.raises(ValueError, match="features"):
        score_samples(torch.zeros(50, 4, dtype=torch.float64), reference)
    with pytest.raises(ValueError, match="samples"):
        score_samples(torch.zeros(3, 5, dtype=torch.float64), reference)
    with pytest.raises(ValueError, match="reference"):
        Reference.of(torch.zeros(5, 5))
