"""Detection metrics against closed forms and scikit-learn; the out-of-distribution scores."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from vaekit.ood import (auroc, average_precision, compressed_nats, detection, fpr_at_tpr,
                        roc_curve, typicality)

STANDARD = NormalDist()
SHIFT, SPREAD = 1.0, 1.5  # outliers ~ N(SHIFT, SPREAD^2), inliers ~ N(0, 1)


def gaussian_closed_forms() -> dict[str, float]:
    """AUROC, AUPR (equal class sizes) and FPR at 95 % TPR of scores N(0, 1) vs N(mu, s^2)."""
    area = STANDARD.cdf(SHIFT / math.sqrt(1 + SPREAD ** 2))  # P(out > in)
    threshold = SHIFT + SPREAD * STANDARD.inv_cdf(0.05)  # flags 95 % of the outliers
    false_positives = 1 - STANDARD.cdf(threshold)
    # average precision = integral of precision over recall, on a fine grid of thresholds
    grid = np.linspace(-12, 14, 20001)
    outlier = NormalDist(SHIFT, SPREAD)
    tpr = np.array([1 - outlier.cdf(t) for t in grid])
    fpr = np.array([1 - STANDARD.cdf(t) for t in grid])
    precision = tpr / np.maximum(tpr + fpr, 1e-300)
    precision_area = float(np.sum(-np.diff(tpr) * precision[1:]))
    return {"auroc": area, "aupr": precision_area, "fpr95": false_positives}


def gaussian_scores(seed: int, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=n), rng.normal(SHIFT, SPREAD, size=n)


def test_two_known_gaussians_match_the_closed_forms_within_their_intervals():
    exact = gaussian_closed_forms()
    inliers, outliers = gaussian_scores(seed=0)
    result = detection("gaussian", inliers, outliers, bootstrap=400, seed=0)
    for name, value in exact.items():
        low, high = result.intervals[name]
        assert low <= value <= high, (name, value, low, high)
        assert low <= result.values[name] <= high


def test_estimates_stay_within_three_bootstrap_standard_errors_over_seeds():
    exact = gaussian_closed_forms()
    for seed in range(1, 5):
        inliers, outliers = gaussian_scores(seed)
        result = detection("gaussian", inliers, outliers, bootstrap=200, seed=seed)
        for name, value in exact.items():
            low, high = result.intervals[name]
            standard_error = (high - low) / (2 * 1.96)
            assert abs(result.values[name] - value) < 3 * standard_error, (seed, name)


def test_auroc_interval_width_matches_the_hanley_mcneil_standard_error():
    inliers, outliers = gaussian_scores(seed=7)
    result = detection("gaussian", inliers, outliers, bootstrap=400, seed=7)
    area, n = result.values["auroc"], len(inliers)
    q1, q2 = area / (2 - area), 2 * area ** 2 / (1 + area)
    se = math.sqrt((area * (1 - area) + (n - 1) * (q1 - area ** 2) + (n - 1) * (q2 - area ** 2))
                   / (n * n))
    low, high = result.intervals["auroc"]
    assert (high - low) / (2 * 1.96) == pytest.approx(se, rel=0.25)


def test_metrics_agree_with_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    inliers = np.round(rng.normal(size=700), 1)  # rounded: many ties
    outliers = np.round(rng.normal(0.4, 1.2, size=300), 1)
    labels = np.r_[np.zeros(700), np.ones(300)]
    scores = np.r_[inliers, outliers]
    assert auroc(inliers, outliers) == pytest.approx(metrics.roc_auc_score(labels, scores),
                                                     abs=1e-12)
    assert average_precision(inliers, outliers) == pytest.approx(
        metrics.average_precision_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    expected = fpr[np.argmax(tpr >= 0.95)]  # the lowest FPR that reaches 95 % TPR
    assert fpr_at_tpr(inliers, outliers) == pytest.approx(expected, abs=1e-12)


def test_perfect_reversed_and_identical_scores():
    low, high = np.arange(10.0), np.arange(10.0) + 100
    assert auroc(low, high) == 1.0 and average_precision(low, high) == 1.0
    assert fpr_at_tpr(low, high) == 0.0
    assert auroc(high, low) == 0.0 and fpr_at_tpr(high, low) == 1.0
    same = np.zeros(5)
    assert auroc(same, same) == 0.5
    fpr, tpr = roc_curve(low, high)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_detection_refuses_too_few_or_non_finite_scores():
    with pytest.raises(ValueError, match="at least 2"):
        detection("x", np.zeros(1), np.zeros(5))
    with pytest.raises(ValueError, match="not finite"):
        detection("x", np.array([0.0, np.nan]), np.zeros(3))


def test_typicality_single_examples_and_batches():
    log_px = np.array([-10.0, -12.0, -8.0, -10.0, -30.0])
    assert typicality(log_px, -10.0).tolist() == [0.0, 2.0, 2.0, 0.0, 20.0]
    batched = typicality(log_px, -10.0, batch=2, seed=0)
    assert len(batched) == 2  # the fifth example is left out
    # each batch value is |mean of two distinct examples + 10|
    pairs = {abs((a + b) / 2 + 10) for i, a in enumerate(log_px) for b in log_px[i + 1:]}
    assert all(any(math.isclose(v, p) for p in pairs) for v in batched)


def test_compressed_length_orders_simple_below_complex_images():
    blank = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    noise = torch.randint(0, 256, (1, 1, 28, 28), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    lengths = compressed_nats(torch.cat([blank, noise]))
    assert lengths[0] < lengths[1]
    assert lengths[1] > 28 * 28 * 7 * math.log(2)  # random bytes do not compress
    binary = (noise > 127).float()  # a binarised image is coded as a 1-bit image
    one_bit = compressed_nats(binary)[0]
    assert one_bit < lengths[1] and one_bit > 28 * 28 * 0.9 * math.log(2)
    colour = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    assert compressed_nats(colour)[0] > compressed_nats(colour[:, :1])[0]
