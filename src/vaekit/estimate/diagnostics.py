"""How far an importance-sampling estimate can be trusted: Pareto k, replicate errors, bias.

IS_k(x) = log (1/k) sum_j w_j is the log of a mean of weights whose distribution is often heavy
tailed. Three things follow, and this module measures each while the weights stream past:

- The delta method's standard error, Var(w) / (k mean(w)^2), is estimated from the same heavy
  tailed draws and comes out too small: the rare large weights that carry the variance are
  rarely drawn. `BlockedWeights` keeps the weight sums of B consecutive blocks of each example's
  draws; the spread of estimates made from disjoint groups of blocks is a replicate measure of
  the error at group sizes k/2, k/4, ..., and the decay of that spread with the group size (1/m
  for finite-variance weights, slower for heavier tails, m^(2 xi - 2) for a tail index xi
  between 1/2 and 1) carries it to k.
- IS_k is biased low by about c/k. The grouped jackknife over the same blocks (Nowozin 2018,
  jackknife variational inference, with blocks in place of single draws) removes that term.
- Whether any of this means something is told by the tail of the weights: the Pareto k of the
  generalized Pareto distribution fitted to each example's largest weights (Vehtari, Simpson,
  Gelman, Yao & Gabry 2024, "Pareto smoothed importance sampling"). Above 0.7 the estimate's
  error is not to be trusted; below 0.5 the weights have a finite variance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PARETO_K_UNRELIABLE = 0.7  # Vehtari et al. 2024: above min(1 - 1/log10(S), 0.7), not reliable
PARETO_K_FINITE_VARIANCE = 0.5  # below it the weights have a finite variance


def tail_size(samples: int) -> int:
    """M, the number of largest weights the generalized Pareto fit uses (Vehtari et al. 2024)."""
    return int(math.ceil(min(0.2 * samples, 3.0 * math.sqrt(samples))))


def pareto_k_threshold(samples: int) -> float:
    """The k above which an estimate from `samples` draws is unreliable: min(1 - 1/log10 S, 0.7)
    (below 0.7 for small S, where even a moderate tail is sampled too thinly)."""
    return min(1.0 - 1.0 / math.log10(samples), PARETO_K_UNRELIABLE) if samples > 10 else 0.0


def generalized_pareto_shape(exceedances: Tensor) -> Tensor:
    """The shape k of a generalized Pareto distribution fitted to each row of exceedances.

    exceedances (B, M) >= 0, sorted ascending along the row. The fit is Zhang & Stephens' (2009)
    empirical Bayes estimate (a posterior mean over a grid of the profile likelihood), then
    shrunk towards 0.5 by a weakly informative prior worth 10 observations, as PSIS does. A row
    with no spread (all weights equal: q is the exact posterior) has no tail: k = -inf.
    """
    x = exceedances.double()  # (B, M)
    n = x.shape[1]
    grid = 30 + int(math.sqrt(n))
    prior = 3.0
    quartile = x[:, max(int(n / 4 + 0.5) - 1, 0)].clamp_min(torch.finfo(torch.float64).tiny)
    largest = x[:, -1]
    degenerate = largest <= 0
    largest = torch.where(degenerate, torch.ones_like(largest), largest)
    j = torch.arange(1, grid + 1, dtype=torch.float64, device=x.device)
    theta = 1.0 / largest[:, None] + (1.0 - torch.sqrt(grid / (j - 0.5)))[None, :] / (
        prior * quartile[:, None])  # (B, grid)
    # profile log-likelihood of each theta: n (log(-theta / k) - k - 1), k = mean log1p(-theta x)
    # (theta < 0 for the heavy tails of importance weights, and then k > 0)
    shape = torch.log1p(-theta[:, :, None] * x[:, None, :]).mean(-1)  # (B, grid)
    profile = n * (torch.log(-theta / shape) - shape - 1.0)  # (B, grid)
    weights = torch.softmax(torch.nan_to_num(profile, nan=-math.inf), dim=1)  # (B, grid)
    theta_hat = (theta * weights).sum(1)  # (B,)
    k = torch.log1p(-theta_hat[:, None] * x).mean(1)  # (B,)
    k = (k * n + 10 * 0.5) / (n + 10)
    return torch.where(degenerate, torch.full_like(k, -math.inf), k)


class TailWeights:
    """The M largest log-weights of each example, kept while blocks of draws stream past, and
    their Pareto k. M = tail_size(k) + 1: the tail and the threshold it is measured from."""

    def __init__(self, samples: int):
        self.samples = samples
        self.keep = min(tail_size(samples) + 1, samples)
        self.top: Tensor | None = None  # (keep, B) descending

    def add(self, log_w: Tensor) -> None:
        log_w = log_w.double()  # (S, B)
        merged = log_w if self.top is None else torch.cat([self.top, log_w])
        self.top = merged.topk(min(self.keep, len(merged)), dim=0).values  # (<= keep, B)

    def pareto_k(self) -> Tensor:
        """Pareto k of each example's weights. (B,); NaN with fewer than 5 draws."""
        if self.top is None or len(self.top) < 5:
            return torch.full((0 if self.top is None else self.top.shape[1],), math.nan,
                              dtype=torch.float64)
        top = self.top  # (M + 1, B) descending
        # weights relative to the largest: exp of differences, so no overflow whatever the scale
        scaled = torch.exp(top - top[0])  # (M + 1, B) in (0, 1]
        exceedances = (scaled[:-1] - scaled[-1]).flip(0).T  # (B, M) ascending
        return generalized_pareto_shape(exceedances)


def _log_mean(log_sums: Tensor, counts: Tensor) -> Tensor:
    """log (sum of the weights of some blocks / their draws). log_sums (..., G, B) -> (..., B)"""
    return torch.logsumexp(log_sums, dim=-2) - torch.log(counts.sum(-1))[..., None]


class BlockedWeights:
    """log sum_j w_j over each of B equal, consecutive blocks of every example's k draws.

    Blocks hold m = k // B draws each; the r = k - B m draws left over (fewer than B) form a
    remainder that belongs to no block. Blocks are fixed by the draw's index, so the same draws
    give the same blocks whatever the chunking. From them: the estimate, replicate variances at
    group sizes k/2, k/4, ..., the grouped-jackknife estimate and the rise over the last
    doubling.
    """

    def __init__(self, samples: int, blocks: int = 64):
        self.samples = samples
        self.blocks = max(1, min(blocks, samples))
        self.block_size = samples // self.blocks
        self.log_sums: Tensor | None = None  # (blocks + 1, B): the blocks, then the remainder
        self.seen = 0

    def add(self, log_w: Tensor, first_sample: int) -> None:
        """Draws first_sample .. first_sample + S - 1 of every example: log_w (S, B)."""
        log_w = log_w.double()
        if self.log_sums is None:
            self.log_sums = torch.full((self.blocks + 1, log_w.shape[1]), -math.inf,
                                       dtype=torch.float64, device=log_w.device)
        index = torch.arange(first_sample, first_sample + len(log_w), device=log_w.device)
        block = (index // self.block_size).clamp_max(self.blocks)  # (S,) blocks, remainder
        for b in torch.unique(block).tolist():
            rows = log_w[block == b]  # (S_b, B)
            self.log_sums[b] = torch.logaddexp(self.log_sums[b], torch.logsumexp(rows, dim=0))
        self.seen += len(log_w)

    def _complete(self) -> Tensor:
        if self.log_sums is None or self.seen != self.samples:
            raise ValueError(f"BlockedWeights saw {self.seen} of {self.samples} draws")
        return self.log_sums

    def estimate(self) -> Tensor:
        """IS_k of every example (the same as LogMeanExp's). (B,)"""
        return torch.logsumexp(self._complete(), dim=0) - math.log(self.samples)

    def group_estimates(self, groups: int) -> Tensor:
        """IS estimates from `groups` disjoint groups of consecutive blocks (the remainder left
        out), each of blocks // groups blocks. (groups, B)"""
        blocks = self._complete()[:self.blocks]
        size = self.blocks // groups
        grouped = blocks[:size * groups].reshape(groups, size, -1)  # (G, blocks/G, B)
        return torch.logsumexp(grouped, dim=1) - math.log(size * self.block_size)  # (G, B)

    def replicate_levels(self, max_groups: int = 16) -> list[tuple[float, Tensor]]:
        """(draws per group, the per-example variance of one group's estimate) for G = 2, 4, ...,
        max_groups groups: the spread of disjoint replicates at each group size, from k/2 down
        to k/max_groups draws (smaller groups say little about k: the log of a mean of few heavy
        tailed weights behaves differently). [(m, (B,)), ...]"""
        levels = []
        groups = 2
        while groups <= min(self.blocks, max_groups):
            estimates = self.group_estimates(groups)  # (G, B)
            levels.append((float(self.blocks // groups * self.block_size), estimates.var(dim=0)))
            groups *= 2
        return levels

    def jackknife(self) -> Tensor:
        """The grouped-jackknife estimate of each example's log p(x): IS_k with its O(1/k) bias
        removed (Nowozin 2018, with blocks of m draws in place of single draws). Each estimate
        that leaves one block out uses k - m draws, so with L_n ~ L - c/n,
        L = L_k + c/k where c = (L_k - mean_b L_(-b)) / (1/(k - m) - 1/k); with no remainder
        this is the textbook B L_k - (B - 1) mean_b L_(-b). (B,)"""
        log_sums = self._complete()  # (blocks + 1, B)
        if self.blocks < 2:
            return self.estimate()
        k, m = self.samples, self.block_size
        full = self.estimate()  # (B,)
        # log of the total less block b, from the other rows' sums (no cancellation)
        leave_out = torch.stack([
            torch.logsumexp(torch.cat([log_sums[:b], log_sums[b + 1:]]), dim=0)
            for b in range(self.blocks)]) - math.log(k - m)  # (blocks, B)
        c = (full - leave_out.mean(0)) / (1.0 / (k - m) - 1.0 / k)  # (B,)
        return full + c / k

    def last_doubling_rise(self) -> Tensor:
        """IS_k minus IS_(k/2) of the first half of the blocks: what the last doubling of k
        added, a visible signal of how far the estimate still is from converged. (B,)"""
        return self.estimate() - self.group_estimates(2)[0]


def replicate_variance_at(levels: list[tuple[float, Tensor]], samples: int,
                          weights: Tensor | None = None) -> tuple[float, float]:
    """The variance of a dataset mean of IS estimates at `samples` draws, from replicates.

    levels: replicate_levels() of every example pooled (m, per-example variances (B,)). The
    dataset sum V(m) = sum_n Var(L_m(x_n)) is fitted as a power of m by least squares in
    log-log over the levels, its slope held to [-1, 0] (1/m is the fastest a mean can converge,
    and a variance does not grow with more draws), and extrapolated to m = samples. Returns
    (sum_n Var(L_samples(x_n)), the slope); the variance of the mean is that over N^2.
    """
    if not levels:
        return math.nan, math.nan
    sizes = torch.tensor([m for m, _ in levels], dtype=torch.float64)
    totals = torch.stack([v.sum() if weights is None else (v * weights).sum()
                          for _, v in levels]).double().cpu()  # (levels,)
    usable = totals > 0
    if not bool(usable.any()):
        return 0.0, -1.0
    x, y = torch.log(sizes[usable]), torch.log(totals[usable])
    if len(x) == 1:
        slope = -1.0
    else:
        slope = float(((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).square().sum())
        slope = min(0.0, max(-1.0, slope))
    intercept = float(y.mean()) - slope * float(x.mean())  # the fit with the held slope
    return math.exp(intercept + slope * math.log(samples)), slope
