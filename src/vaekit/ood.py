"""Out-of-distribution detection: scores built on log p(x), and how well they separate two sets.

Every score is oriented so that a larger value means "more out of distribution":

    likelihood      -log p(x)                              the raw likelihood; fails on
                                                           Fashion-MNIST vs MNIST (Nalisnick et
                                                           al. 2019: simpler inputs score higher)
    typicality      |log p(x) - mean log p(x) on the run's test set|
                                                           Nalisnick et al. 2019b: in-distribution
                                                           data are typical, not most likely; a
                                                           batch of M examples uses its mean
    complexity      -log p(x) - L(x)                       Serra et al. 2020: L(x) the length of
                                                           x under a lossless image coder (PNG,
                                                           in nats), so simple inputs lose their
                                                           unearned advantage
    likelihood      -(log p(x) - log p_background(x))      Ren et al. 2019: the background model
    ratio                                                  is trained on perturbed inputs
                                                           (`vaekit train --perturb 0.2`) and
                                                           explains the background statistics

    skip ratio      ELBO(x) - L^{>k}(x)                    Havtorn et al. 2021, hierarchical
                                                           runs: L^{>k} draws the lowest k
                                                           groups from their priors, so it
                                                           scores x by what the upper groups
                                                           explain; one score per k = 1 .. L-1

Detection quality, with the out-of-distribution set as the positive class: AUROC, AUPR (average
precision) and the false-positive rate at 95 % true positives, each with a percentile bootstrap
interval (in- and out-of-distribution examples resampled separately).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

TPR_LEVEL = 0.95
INTERVAL = 0.95  # coverage of the bootstrap intervals


# ------------------------------------------------------------------------------------------------
# Detection metrics


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(score of an outlier > score of an inlier) + P(tie) / 2: the area under the ROC curve
    (the Mann-Whitney statistic)."""
    ordered = np.sort(inliers)
    below = np.searchsorted(ordered, outliers, side="left")
    at_most = np.searchsorted(ordered, outliers, side="right")
    return float((below + at_most).sum() / (2.0 * len(inliers) * len(outliers)))


def average_precision(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Area under the precision-recall curve of detecting outliers, as average precision:
    sum over thresholds of (recall step) x precision, ties taken together (as scikit-learn's
    average_precision_score)."""
    scores = np.concatenate([outliers, inliers])
    positive = np.concatenate([np.ones(len(outliers)), np.zeros(len(inliers))])
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    true_positives = np.cumsum(positive)[last_of_value]
    flagged = last_of_value + 1
    precision = true_positives / flagged
    recall = true_positives / len(outliers)
    steps = np.diff(np.r_[0.0, recall])
    return float((steps * precision).sum())


def fpr_at_tpr(inliers: np.ndarray, outliers: np.ndarray, level: float = TPR_LEVEL) -> float:
    """Share of inliers flagged at the highest threshold that flags `level` of the outliers."""
    ordered = np.sort(outliers)[::-1]
    threshold = ordered[max(0, math.ceil(level * len(ordered)) - 1)]
    return float((inliers >= threshold).mean())


def roc_curve(inliers: np.ndarray, outliers: np.ndarray, points: int = 200
              ) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at `points` thresholds spread over the
    scores' quantiles, from (0, 0) to (1, 1)."""
    both = np.concatenate([inliers, outliers])
    thresholds = np.unique(np.quantile(both, np.linspace(0, 1, points)))[::-1]
    fpr = [(inliers >= t).mean() for t in thresholds]
    tpr = [(outliers >= t).mean() for t in thresholds]
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, tpr, 1.0]


METRICS = {"auroc": auroc, "aupr": average_precision, "fpr95": fpr_at_tpr}


@dataclass
class Detection:
    """How well one score separates inliers from outliers, with bootstrap intervals."""

    score: str
    n_in: int
    n_out: int
    values: dict[str, float]  # METRICS name -> value on the data as they are
    intervals: dict[str, tuple[float, float]]  # METRICS name -> (low, high)
    bootstrap: int

    def to_dict(self) -> dict:
        return {"score": self.score, "n_in": self.n_in, "n_out": self.n_out,
                **{name: self.values[name] for name in METRICS},
                **{f"{name}_interval": list(self.intervals[name]) for name in METRICS},
                "bootstrap": self.bootstrap}


def detection(score: str, inliers: np.ndarray, outliers: np.ndarray, *, bootstrap: int = 1000,
              seed: int = 0) -> Detection:
    """All METRICS of a score, with INTERVAL percentile bootstrap intervals from `bootstrap`
    resamples (inliers and outliers resampled separately, with replacement)."""
    inliers, outliers = np.asarray(inliers, np.float64), np.asarray(outliers, np.float64)
    if len(inliers) < 2 or len(outliers) < 2:
        raise ValueError("detection needs at least 2 inliers and 2 outliers")
    if not (np.isfinite(inliers).all() and np.isfinite(outliers).all()):
        raise ValueError(f"score {score!r} is not finite for every example")
    values = {name: fn(inliers, outliers) for name, fn in METRICS.items()}
    rng = np.random.default_rng([seed, 0x00D])
    draws = {name: np.empty(bootstrap) for name in METRICS}
    for b in range(bootstrap):
        resampled_in = inliers[rng.integers(0, len(inliers), len(inliers))]
        resampled_out = outliers[rng.integers(0, len(outliers), len(outliers))]
        for name, fn in METRICS.items():
            draws[name][b] = fn(resampled_in, resampled_out)
    tail = 100 * (1 - INTERVAL) / 2
    intervals = {name: (float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail)))
                 for name, d in draws.items()}
    return Detection(score, len(inliers), len(outliers), values, intervals, bootstrap)


# ------------------------------------------------------------------------------------------------
# Scores


SCORES = {
    "likelihood": "-log p(x): the raw likelihood",
    "typicality": "|log p(x) - mean test log p(x)| (Nalisnick et al. 2019b)",
    "complexity": "-log p(x) - L(x), L the PNG length in nats (Serra et al. 2020)",
    "likelihood_ratio": "-(log p(x) - log p_background(x)) (Ren et al. 2019)",
    "skip_ratio": "ELBO - L^{>k}, the lowest k latent groups drawn from their priors "
                  "(Havtorn et al. 2021); one score per k",
}


def typicality(log_px: np.ndarray, reference_mean: float, batch: int = 1,
               seed: int = 0) -> np.ndarray:
    """|mean log p over a batch - reference mean|: one value per example (batch 1) or per batch
    of `batch` examples, grouped at random (seeded) and without overlap; a remainder shorter
    than a batch is left out. (N // batch,)"""
    if batch == 1:
        return np.abs(log_px - reference_mean)
    order = np.random.default_rng([seed, 0x7E]).permutation(len(log_px))
    usable = len(order) // batch * batch
    means = log_px[order[:usable]].reshape(-1, batch).mean(1)
    return np.abs(means - reference_mean)


def compressed_nats(x: Tensor) -> np.ndarray:
    """Length of each example under PNG (Pillow, strongest compression), in nats: L(x) of
    Serra et al. 2020. x (N, C, H, W): uint8 levels, or the 0/1 values of binarised images
    (then coded as 1-bit images, the object a Bernoulli likelihood scores)."""
    from PIL import Image

    arrays = x.cpu().numpy()
    binary = arrays.dtype != np.uint8
    lengths = np.empty(len(arrays))
    for i, example in enumerate(arrays):
        if binary:
            image = Image.fromarray((example[0] > 0.5).astype(np.uint8) * 255).convert("1")
        elif example.shape[0] == 1:
            image = Image.fromarray(example[0], mode="L")
        else:
            image = Image.fromarray(example.transpose(1, 2, 0), mode="RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        lengths[i] = 8 * len(buffer.getvalue()) * math.log(2.0)
    return lengths
