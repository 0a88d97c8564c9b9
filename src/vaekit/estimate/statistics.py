"""Monte Carlo statistics: running means and log-mean-exps over blocks of samples, in float64.

Every estimator in vaekit reports its sample count and a standard error; these classes keep what
the error needs while the samples stream past (the delta method for log-means of weights, Kong's
effective sample size), so memory stays bounded whatever k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bits_per_dim(log_p: float, dims: int) -> float:
    """A log-probability (nats per example) as bits per dimension: -log2 p / dims."""
    return -log_p / (dims * math.log(2.0))



class MeanSums:
    """Running mean of a per-sample statistic (S, B) over samples, and the variance of that mean.

    Sums are taken around the first block's mean so that large values (log-likelihoods of
    hundreds of nats) with small spread keep their precision.
    """

    def __init__(self):
        self.count = 0
        self.shift = self.total = self.total_sq = None

    def add(self, values: Tensor) -> None:
        values = values.double()  # (S, B)
        if self.shift is None:
            self.shift = values.mean(0)
            self.total = torch.zeros_like(self.shift)
            self.total_sq = torch.zeros_like(self.shift)
        centred = values - self.shift
        self.total += centred.sum(0)
        self.total_sq += centred.square().sum(0)
        self.count += len(values)

    @property
    def mean(self) -> Tensor:
        return self.shift + self.total / self.count  # (B,)

    @property
    def sample_variance(self) -> Tensor:
        """The per-sample variance (unbiased; NaN with one sample). (B,)"""
        if self.count < 2:
            return torch.full_like(self.shift, math.nan)
        return (self.total_sq - self.total.square() / self.count).clamp_min(0) / (self.count - 1)

    @property
    def variance_of_mean(self) -> Tensor:
        return self.sample_variance / self.count  # (B,)


class LogMeanExp:
    """log (1/k) sum_j exp(a_j) per example, streamed over blocks of samples (S, B) in float64.

    Besides the estimate it keeps what its Monte Carlo error needs. With weights w_j = exp(a_j)
    and r_j = w_j / mean(w), the delta method gives Var[log mean w] ~ Var(r) / k, and the
    effective sample size is (sum w)^2 / sum w^2 (Kong 1992): k when all weights agree, 1 when
    one sample carries all the weight, which is when no error bar can be trusted. A companion
    statistic c_j (the ELBO's summand) gets its covariance with r, so the variance of
    log mean w - mean c (the ELBO gap) is known too.
    """

    def __init__(self):
        self.count = 0
        self.max = self.sum_w = self.sum_w2 = None
        self.companion = MeanSums()
        self.sum_wc = None  # sum of w_j (c_j - shift), scaled like sum_w

    def add(self, log_w: Tensor, companion: Tensor | None = None) -> None:
        log_w = log_w.double()  # (S, B)
        if self.max is None:
            self.max = torch.full_like(log_w[0], -math.inf)
            self.sum_w, self.sum_w2 = torch.zeros_like(self.max), torch.zeros_like(self.max)
            self.sum_wc = torch.zeros_like(self.max)
        new_max = torch.maximum(self.max, log_w.max(0).values)
        anchor = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        rescale = torch.exp(self.max - anchor)  # 0 while nothing was added (exp(-inf))
        w = torch.exp(log_w - anchor)  # (S, B), at most 1
        self.sum_w = self.sum_w * rescale + w.sum(0)
        self.sum_w2 = self.sum_w2 * rescale.square() + w.square().sum(0)
        if companion is not None:
            self.companion.add(companion)
            centred = companion.double() - self.companion.shift
            self.sum_wc = self.sum_wc * rescale + (w * centred).sum(0)
        self.max = anchor
        self.count += len(log_w)

    @property
    def estimate(self) -> Tensor:
        """log of the mean weight. (B,)"""
        return self.max + torch.log(self.sum_w) - math.log(self.count)

    @property
    def relative_weight_variance(self) -> Tensor:
        """Var(r) of the normalised weights r_j = w_j / mean(w) (unbiased). (B,)"""
        if self.count < 2:
            return torch.full_like(self.max, math.nan)
        k = self.count
        return (k * k * self.sum_w2 / self.sum_w.square() - k) / (k - 1)

    @property
    def variance(self) -> Tensor:
        """Delta-method variance of `estimate`. (B,)"""
        return self.relative_weight_variance / self.count

    @property
    def effective_sample_size(self) -> Tensor:
        return self.sum_w.square() / self.sum_w2  # (B,)

    @property
    def gap_variance(self) -> Tensor:
        """Delta-method variance of estimate - companion mean. (B,)"""
        k = self.count
        if k < 2:
            return torch.full_like(self.max, math.nan)
        covariance = (k * self.sum_wc / self.sum_w - self.companion.total) / (k - 1)
        return (self.relative_weight_variance + self.companion.sample_variance
                - 2 * covariance).clamp_min(0) / k



def log_mean_exp(log_w: Tensor, companion: Tensor | None = None) -> LogMeanExp:
    """The estimator of a whole (k, B) block of log weights, with its error (see LogMeanExp);
    companion (k, B): a per-sample statistic to average alongside (e.g. log_w: the ELBO)."""
    sums = LogMeanExp()
    sums.add(log_w, companion)
    return sums
