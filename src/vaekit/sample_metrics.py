"""Scores of a set of generated samples against a set of real examples, in a feature space.

Pure arithmetic on feature matrices (N, F) and (R, F); where the features come from is
features.py, which samples are scored is sample_quality.py.

    Frechet distance   |mu_s - mu_r|^2 + tr(C_s + C_r - 2 (C_s C_r)^(1/2))  (Heusel et al. 2017)
    KID                unbiased MMD^2, kernel (x.y / F + 1)^3         (Binkowski et al. 2018)
    precision, recall  share of samples inside the reals' k-NN balls, and of reals inside
                       the samples' k-NN balls, k = 3              (Kynkaanniemi et al. 2019)
    density, coverage  mean number of real k-NN balls holding a sample, / k; share of real
                       balls holding at least one sample                (Naeem et al. 2020)

The reference (the reals) is the same for every run on a dataset, so the intervals describe
the noise of the N samples, which is what differs between runs. Each score gets a 95 %
bootstrap percentile interval (bias-corrected, see _interval) from B replicates, each computed
exactly from quantities measured once: the Frechet distance (weighted moments), KID (the U-statistic over distinct pairs), precision
and density (per-sample indicators and counts) resample the samples with the reference fixed.
Recall and coverage are averages over the reference's examples of whether the samples reach
them; they resample the reference's examples with the samples fixed, because resampling the
samples with replacement keeps only about 63 % of them distinct and would bias any score that
counts what a set covers downwards. KID's standard error is the spread of its replicates. All
distances are exact Euclidean (no approximate neighbour search), chunked within a fixed memory
budget. Distances and kernel values come from one float32 matrix product per block (features
are standardised, O(1), so float32 keeps them to about 1e-6 relative); sums along a row are
float32 (cascade summation), sums of rows float64, and second moments are taken of centred
features; KID agrees with a float64 computation to about 1e-8 relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

K_NEAREST = 3  # Kynkaanniemi et al. 2019 and Naeem et al. 2020 both recommend k = 3 ... 5
BOOTSTRAP = 100  # replicates: enough for a 95 % percentile interval to two figures
CHUNK_ELEMENTS = 1 << 20  # (rows x columns) of one block: 4 MiB of float32, stays in cache


def _rows_per_chunk(columns: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, columns))


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances (len(a), len(b)), in the inputs' dtype."""
    squared = a.square().sum(1, keepdim=True) + b.square().sum(1) - 2.0 * a @ b.T  # (A, B)
    return squared.clamp_min_(0.0).sqrt_()


def _blocks(a: Tensor, b: Tensor, kernel: bool = True):
    """(start, squared distances (c, B), KID kernel (c, B) or None) for row blocks of a against
    b, both from one float32 product a b^T: |a|^2 + |b|^2 - 2 a.b and (a.b / F + 1)^3. Squared
    distances of a point to itself or a copy may come out a rounding error below 0; only
    comparisons and the k-th smallest are taken of them."""
    a32, b32 = a.float(), b.float()
    b_norms = (b32 * b32).sum(1)  # (B,)
    step = _rows_per_chunk(len(b))
    for start in range(0, len(a), step):
        block = a32[start:start + step]  # (c, F)
        dot = block @ b32.T  # (c, B)
        squared = (block * block).sum(1, keepdim=True) + b_norms  # (c, B)
        squared.sub_(dot, alpha=2.0)
        cubic = None
        if kernel:
            dot.div_(a.shape[1]).add_(1.0)
            cubic = dot * dot
            cubic.mul_(dot)  # (c, B) the polynomial kernel of degree 3
        yield start, squared, cubic


def _sum64(block: Tensor) -> float:
    """Sum of a float32 block: rows in float32 (cascade summation), the rows' sums in float64."""
    return float(block.sum(1).double().sum())


def polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's kernel k(x, y) = (x.y / F + 1)^3 (Binkowski et al. 2018). (len(a), len(b))"""
    return (a @ b.T / a.shape[1] + 1.0).pow_(3)


def _kth_neighbour(squared: Tensor, k: int) -> Tensor:
    """Distance to the k-th nearest other point from squared distances (c, N) that include the
    point itself (at distance 0): the (k + 1)-th smallest. (c,) float64"""
    kth = squared.topk(k + 1, dim=1, largest=False).values[:, k]  # (c,)
    return kth.double().clamp_min(0.0).sqrt()


def nearest_neighbour_radii(features: Tensor, k: int = K_NEAREST) -> Tensor:
    """Distance of each point to its k-th nearest other point of the same set. (N,)"""
    n = len(features)
    if n <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} points, got {n}")
    radii = torch.empty(n, dtype=torch.float64)
    for start, squared, _ in _blocks(features, features, kernel=False):
        radii[start:start + len(squared)] = _kth_neighbour(squared, k)
    return radii


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)  # symmetric: exact square root
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


@dataclass
class Reference:
    """The real examples' features and what every score against them needs, computed once."""

    features: Tensor  # (R, F) float64
    radii: Tensor  # (R,) distance to the k-th nearest other real
    mean: Tensor  # (F,)
    cov: Tensor  # (F, F)
    cov_sqrt: Tensor  # (F, F) symmetric square root of cov
    kernel_mean: float  # mean of k(r_i, r_j) over i != j
    k: int

    @staticmethod
    def of(features: Tensor, k: int = K_NEAREST) -> "Reference":
        features = features.detach().to("cpu", torch.float64)
        n = len(features)
        if n < 2 * k + 2:
            raise ValueError(f"a reference needs at least {2 * k + 2} examples, got {n}")
        radii = torch.empty(n, dtype=torch.float64)
        total = 0.0
        for start, squared, kernel in _blocks(features, features):
            radii[start:start + len(squared)] = _kth_neighbour(squared, k)
            kernel.diagonal(start).zero_()  # pairs of distinct examples only
            total += _sum64(kernel)
        return Reference.from_parts(features, radii, total / (n * (n - 1)), k)

    @staticmethod
    def from_parts(features: Tensor, radii: Tensor, kernel_mean: float,
                   k: int = K_NEAREST) -> "Reference":
        """A reference from its features and the two costly parts (k-NN radii, kernel mean)."""
        features = features.to(torch.float64)
        if radii.shape != (len(features),):
            raise ValueError("one radius per reference example is needed")
        cov = torch.cov(features.T)  # (F, F)
        return Reference(features, radii.to(torch.float64), features.mean(0), cov,
                         _sqrtm_psd(cov), float(kernel_mean), k)


def _frechet(mean: Tensor, cov: Tensor, reference: Reference) -> Tensor:
    """Frechet distance of Gaussians (mean (..., F), cov (..., F, F)) to the reference's.

    tr (C_s C_r)^(1/2) = sum of sqrt(eigenvalues of C_r^(1/2) C_s C_r^(1/2)), a symmetric matrix,
    so no general (complex) matrix square root is needed."""
    root = reference.cov_sqrt
    middle = root @ cov @ root  # (..., F, F)
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp_min(0.0).sqrt().sum(-1)  # (...)
    return ((mean - reference.mean).square().sum(-1) + cov.diagonal(dim1=-2, dim2=-1).sum(-1)
            + reference.cov.trace() - 2.0 * trace_sqrt)


def frechet_distance(samples: Tensor, reference: Reference) -> float:
    samples = samples.detach().to("cpu", torch.float64)
    return float(_frechet(samples.mean(0), torch.cov(samples.T), reference))


def _interval(value: float, replicates: Tensor) -> dict:
    """The 95 % percentile interval of the replicates, shifted by the bootstrap's estimate of the
    estimator's bias (replicates' mean - value; Efron & Tibshirani 1993, ch. 10). The Frechet
    distance and KID are biased upwards at finite N, and a resample, a third of it duplicates,
    exaggerates that; for averages of indicators the shift is about zero."""
    low, high = torch.quantile(replicates, torch.tensor([0.025, 0.975], dtype=replicates.dtype))
    bias = float(replicates.mean()) - value
    return {"value": value, "low": float(low) - bias, "high": float(high) - bias}


def _resample_weights(n: int, bootstrap: int, generator: torch.Generator) -> Tensor:
    """Counts of each of n items in `bootstrap` resamples with replacement. (B, n), rows sum to n"""
    draws = torch.randint(n, (bootstrap, n), generator=generator)  # (B, n)
    return torch.zeros(bootstrap, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(bootstrap, n, dtype=torch.float64))


def score_samples(samples: Tensor, reference: Reference, *, bootstrap: int = BOOTSTRAP,
                  seed: int = 0) -> dict:
    """Every score of `samples` (N, F) against `reference`, each with a 95 % bootstrap interval.

    Returns {"frechet_distance": {"value", "low", "high"}, "kid": {... "se"}, "precision",
    "recall", "density", "coverage", "n", "n_reference", "k", "bootstrap"}."""
    fake = samples.detach().to("cpu", torch.float64)
    n, reals, k = len(fake), reference.features, reference.k
    if n <= k + 1:
        raise ValueError(f"scoring needs more than {k + 1} samples, got {n}")
    if fake.shape[1] != reals.shape[1]:
        raise ValueError(f"samples have {fake.shape[1]} features, the reference {reals.shape[1]}")
    generator = torch.Generator().manual_seed(seed)
    weights = _resample_weights(n, bootstrap, generator)  # (B, N) resampled samples
    reference_weights = _resample_weights(len(reals), bootstrap, generator)  # (B, R)

    # pass 1, samples against samples: their k-NN radii (recall) and KID's first term
    radii = torch.empty(n, dtype=torch.float64)
    pair_sums = torch.zeros(bootstrap, dtype=torch.float64)  # sum_{j != j'} w_j w_j' k(s_j, s_j')
    kernel_total = 0.0
    weights32 = weights.float()
    for start, squared, kernel in _blocks(fake, fake):
        rows = slice(start, start + len(squared))
        radii[rows] = _kth_neighbour(squared, k)
        kernel.diagonal(start).zero_()  # pairs of distinct samples only
        kernel_total += _sum64(kernel)
        # counts are small integers, exact in float32; each row's sum of N terms stays at
        # float32 precision, the sum over rows is float64
        pair_sums += ((kernel @ weights32.T).double() * weights[:, rows].T).sum(0)

    # pass 2, samples against reals
    inside_count = torch.empty(n, dtype=torch.float64)  # real balls holding sample j
    cross_mean = torch.empty(n, dtype=torch.float64)  # mean_i k(s_j, r_i)
    nearest_sample = torch.full((len(reals),), math.inf)  # squared, to real i
    reach_margin = torch.full((len(reals),), math.inf)  # min_j d(s_j, r_i)^2 - radius_j^2
    real_radii_sq = reference.radii.square().float()  # (R,)
    sample_radii_sq = radii.square().float()  # (N,)
    for start, squared, kernel in _blocks(fake, reals):
        rows = slice(start, start + len(squared))
        inside = squared < real_radii_sq  # (c, R): sample j in real i's ball
        inside_count[rows] = torch.count_nonzero(inside, dim=1).double()
        nearest_sample = torch.minimum(nearest_sample, squared.amin(0))
        squared.sub_(sample_radii_sq[rows, None])  # < 0: real i in sample j's ball
        reach_margin = torch.minimum(reach_margin, squared.amin(0))
        cross_mean[rows] = kernel.sum(1).double() / len(reals)
    covered = nearest_sample < real_radii_sq  # (R,) real i's ball holds a sample
    reached = reach_margin < 0  # (R,) real i lies in a sample's ball

    # each replicate's mean and covariance from features centred at the full sample's mean,
    # so the float32 product of the second moments cancels nothing
    centre = fake.mean(0)  # (F,)
    centred = (fake - centre).float()  # (N, F)
    dims = fake.shape[1]
    second = torch.zeros(bootstrap, dims * dims, dtype=torch.float64)  # (B, F*F)
    for start in range(0, n, 1024):  # sum_j w_bj c_j c_j^T, one product per block of rows
        block = centred[start:start + 1024]  # (c, F)
        outer = (block[:, :, None] * block[:, None, :]).flatten(1)  # (c, F*F)
        second += (weights32[:, start:start + 1024] @ outer).double()
    shift = (weights @ (fake - centre)) / n  # (B, F) replicate mean - full mean
    fd_mean = centre + shift  # (B, F)
    fd_cov = (second.view(bootstrap, dims, dims)
              - n * shift[:, :, None] * shift[:, None, :]) / (n - 1)  # (B, F, F)
    fd_values = _frechet(fd_mean, fd_cov, reference)  # (B,)

    kid = kernel_total / (n * (n - 1)) + reference.kernel_mean - 2.0 * float(cross_mean.mean())
    distinct_pairs = n * n - weights.square().sum(1)  # (B,)
    kid_values = pair_sums / distinct_pairs + reference.kernel_mean \
        - 2.0 * (weights @ cross_mean) / n  # (B,)

    precision_each = (inside_count > 0).double()  # (N,)
    result = {
        "frechet_distance": _interval(frechet_distance(fake, reference), fd_values),
        "kid": {**_interval(kid, kid_values), "se": float(kid_values.std())},
        "precision": _interval(float(precision_each.mean()), weights @ precision_each / n),
        "recall": _interval(float(reached.double().mean()),
                            reference_weights @ reached.double() / len(reals)),
        "density": _interval(float(inside_count.mean()) / k, weights @ inside_count / (n * k)),
        "coverage": _interval(float(covered.double().mean()),
                              reference_weights @ covered.double() / len(reals)),
        "n": n, "n_reference": len(reals), "k": k, "bootstrap": bootstrap,
    }
    for name in ("frechet_distance", "kid"):
        if not math.isfinite(result[name]["value"]):
            raise ValueError(f"the {name} is not finite: the features hold NaN or Inf")
    return result


SCORES = ("frechet_distance", "kid", "precision", "recall", "density", "coverage")
LOWER_IS_BETTER = ("frechet_distance", "kid")
