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
# Largest log-weights closer together than this (nats) are taken as equal: their spread is the
# rounding of float32 log-densities, and an estimate from them is off by less than this anyway.
FLAT_TAIL = 1e-3


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
        k = generalized_pareto_shape(exceedances)
        # Weights that agree to within FLAT_TAIL nats (q is the posterior, up to the rounding of
        # float32 log-densities) have no tail to speak of, whatever shape their rounding has.
        flat = (top[0] - top[-1]) < FLAT_TAIL
        return torch.where(flat, torch.full_like(k, -math.inf), k)


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

    def group_jackknives(self, groups: int) -> Tensor:
        """The jackknife estimate made within each of `groups` disjoint groups of blocks.
        (groups, B)"""
        blocks = self._complete()[:self.blocks]
        size = self.blocks // groups
        grouped = blocks[:size * groups].reshape(groups, size, -1)  # (G, blocks/G, B)
        return torch.stack([_jackknife(group, size, self.block_size, size * self.block_size)
                            for group in grouped])

    def replicate_levels(self, max_groups: int = 16,
                         statistic: str = "estimate") -> list[tuple[float, Tensor]]:
        """(draws per group, the per-example variance of one group's estimate) for G = 2, 4, ...,
        max_groups groups: the spread of disjoint replicates at each group size, from k/2 down
        to k/max_groups draws (smaller groups say little about k: the log of a mean of few heavy
        tailed weights behaves differently). [(m, (B,)), ...]"""
        levels = []
        groups = 2
        make = {"estimate": self.group_estimates, "jackknife": self.group_jackknives}[statistic]
        while groups <= min(self.blocks // (2 if statistic == "jackknife" else 1), max_groups):
            estimates = make(groups)  # (G, B)
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
        return _jackknife(log_sums, self.blocks, self.block_size, self.samples)

    def last_doubling_rise(self) -> Tensor:
        """IS_k minus IS_(k/2) of the first half of the blocks: what the last doubling of k
        added, a visible signal of how far the estimate still is from converged. (B,)"""
        return self.estimate() - self.group_estimates(2)[0]


def _jackknife(rows: Tensor, blocks: int, block_size: int, draws: int) -> Tensor:
    """The grouped jackknife of weight sums: rows (R, B) are log sums of which the first
    `blocks` are blocks of block_size draws (left out in turn) and any others a remainder that
    every leave-out keeps; `draws` in all. (B,)"""
    full = torch.logsumexp(rows, dim=0) - math.log(draws)  # (B,)
    # log of the total less block b, from the other rows' sums (no cancellation)
    leave_out = torch.stack([torch.logsumexp(torch.cat([rows[:b], rows[b + 1:]]), dim=0)
                             for b in range(blocks)]) - math.log(draws - block_size)  # (blocks, B)
    c = (full - leave_out.mean(0)) / (1.0 / (draws - block_size) - 1.0 / draws)  # (B,)
    return full + c / draws


def replicate_variance_at(levels: list[tuple[float, Tensor]],
                          samples: int) -> tuple[float, float]:
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
    totals = torch.stack([v.sum() for _, v in levels]).double().cpu()  # (levels,)
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


# ------------------------------------------------------------------------------------------------
# Per-example columns and the dataset figures made of them

REPLICATE_GROUPS = (2, 4, 8, 16)  # group counts whose replicate spreads are kept per example
BLOCKS = 64


def group_size(samples: int, groups: int) -> int:
    """Draws in each of `groups` groups of BlockedWeights(samples)'s blocks."""
    blocks = max(1, min(BLOCKS, samples))
    return blocks // groups * (samples // blocks)


def diagnostic_columns(prefix: str, blocked: BlockedWeights, tail: TailWeights, *,
                       jackknife: bool) -> dict[str, Tensor]:
    """Per-example diagnostics of one estimator as named columns (B,) each: Pareto k, the
    replicate variance at each of REPLICATE_GROUPS (NaN where there are too few blocks) and,
    with jackknife=True, the jackknife estimate, its replicate variances and the rise over the
    last doubling of k."""
    examples = blocked.log_sums.shape[1]
    nan = torch.full((examples,), math.nan, dtype=torch.float64, device=blocked.log_sums.device)
    columns = {f"{prefix}_pareto_k": tail.pareto_k().to(nan.device)}
    statistics = ("estimate", "jackknife") if jackknife else ("estimate",)
    for statistic in statistics:
        name = prefix if statistic == "estimate" else f"{prefix}_jackknife"
        found = {groups: variance for groups, (_, variance) in zip(
            REPLICATE_GROUPS, blocked.replicate_levels(max(REPLICATE_GROUPS), statistic))}
        for groups in REPLICATE_GROUPS:
            columns[f"{name}_rep_var_{groups}"] = found.get(groups, nan)
    if jackknife:
        two_blocks = blocked.blocks >= 2
        columns[f"{prefix}_jackknife"] = blocked.jackknife() if two_blocks else nan
        columns[f"{prefix}_rise"] = blocked.last_doubling_rise() if two_blocks else nan
    return columns


def diagnostic_names(prefix: str, *, jackknife: bool) -> tuple[str, ...]:
    """The column names diagnostic_columns gives, in its order."""
    names = [f"{prefix}_pareto_k", *(f"{prefix}_rep_var_{g}" for g in REPLICATE_GROUPS)]
    if jackknife:
        names += [*(f"{prefix}_jackknife_rep_var_{g}" for g in REPLICATE_GROUPS),
                  f"{prefix}_jackknife", f"{prefix}_rise"]
    return tuple(names)


def replicate_standard_error(per_example: dict[str, Tensor], name: str,
                             samples: int) -> tuple[float, float]:
    """The standard error of the dataset mean of estimator `name` (log_px, log_px_jackknife,
    log_px_naive) at `samples` draws, from its replicate columns; and the fitted slope of the
    variance against the draws per group (-1: the 1/k of finite-variance weights)."""
    levels = []
    for groups in REPLICATE_GROUPS:
        variance = per_example.get(f"{name}_rep_var_{groups}")
        if variance is not None and bool(torch.isfinite(variance).all()):
            levels.append((float(group_size(samples, groups)), variance))
    if not levels:
        return math.nan, math.nan
    total, slope = replicate_variance_at(levels, samples)
    return math.sqrt(total) / len(levels[0][1]), slope
