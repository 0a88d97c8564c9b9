"""Importance sampling: log p(x) from k samples of q(z|x) per example, and the naive estimator.

    IS_k(x)      = log (1/k) sum_j p(x, z_j) / q(z_j|x),   z_j ~ q(z|x)      (Burda et al. 2016)
    naive_k(x)   = log (1/k) sum_j p(x | z_j),             z_j ~ p(z)         (the note's point 9)

E[IS_k] rises with k to log p(x) (it is the IWAE bound, an ELBO at k = 1); the naive estimator
targets the same number but its weights live where the prior puts z, not where x was made, so
it needs vastly more samples.

Noise: sample j of example i is a fixed function of (seed, purpose, split, i, j)
(randomness.per_example_normal), so results do not depend on the batch size, on how the k
samples are chunked or on the number of processes, and IS_k for a smaller k uses the first k
samples of a larger one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ..latent import Inference
from ..model import VAE
from ..randomness import SAMPLE_BLOCK, per_example_normal
from .chunks import decode_samples, sample_block
from .decoding import log_likelihood
from .diagnostics import BlockedWeights, TailWeights, diagnostic_columns, diagnostic_names
from .statistics import LogMeanExp, MeanSums


@dataclass
class ImportanceBlock:
    """One block of S importance samples for each of B examples."""

    z: Tensor  # (S, B, D) draws from q(z|x)
    log_likelihood: Tensor  # (S, B) log p(x | z_j)
    log_weight: Tensor  # (S, B) log p(x, z_j) - log q(z_j | x)
    kl_per_dim: Tensor  # (S, B, D) log q(z_j,d | x) - log p(z_j,d): the KL's one-sample estimate


def noise_chunks(model: VAE, start: int, examples: int, k: int, key: tuple, block: int,
                 device: torch.device) -> Iterator[Tensor]:
    """N(0, I) noise for samples 0..k-1 of examples start.., in chunks of at most `block`
    samples: (S, B, D) each. Each block of randomness.SAMPLE_BLOCK samples is drawn once."""
    for first in range(0, k, SAMPLE_BLOCK):
        last = min(k, first + SAMPLE_BLOCK)
        eps = per_example_normal((model.latent_dim,), start, start + examples, first, last,
                                 key).to(device)  # (S_block, B, D)
        yield from eps.split(block)



def importance_blocks(model: VAE, x: Tensor, start: int, k: int, *, seed: int, split: str,
                      block: int, y: Tensor | None = None,
                      samples_per_pass: int | None = None,
                      inference: Inference | None = None) -> Iterator[ImportanceBlock]:
    """k samples z_j ~ q(z|x) per example of x (B, *shape), in blocks of `block` samples.

    Works from the model's latent interface (latent.py), whatever its groups: each block of noise
    becomes one draw of every group, log p(x | code) is scored, and log q - log p is summed over
    groups. Example start + i of the split gets the noise of that index (see the module doc).
    y (B,): the labels of a conditional model, whose weights then estimate log p(x | y). Where a
    group does not factorise over its dimensions (a mixture or vamp prior) there is no
    per-dimension KL: NaN there. samples_per_pass: samples of each example decoded at once (see
    log_likelihood). inference: model.infer(x, y), when the caller has it already.
    """
    samples_per_pass = samples_per_pass or decode_samples(model, len(x))
    inference = inference or model.infer(x, y)
    for eps in noise_chunks(model, start, len(x), k, (seed, "importance", split), block,
                            x.device):
        draw = inference.draw(eps)  # every group, (S, B, D_l) each
        log_px_given_z = log_likelihood(model, draw.code, x, samples_per_pass, y)  # (S, B)
        # log q(z|x) - log p(z) per dimension; the sum over dimensions gives the log weight.
        kl_per_dim = draw.log_ratio_per_dimension()  # (S, B, D) or None
        if kl_per_dim is not None:
            log_ratio = kl_per_dim.sum(-1)  # (S, B)
        else:
            log_ratio = draw.log_ratio()  # (S, B)
            kl_per_dim = torch.full_like(draw.z, math.nan)  # (S, B, D)
        log_weight = log_px_given_z - log_ratio  # (S, B)
        yield ImportanceBlock(draw.z, log_px_given_z, log_weight, kl_per_dim)


def prior_blocks(model: VAE, x: Tensor, start: int, k: int, *, seed: int, split: str,
                 block: int, y: Tensor | None = None,
                 samples_per_pass: int | None = None) -> Iterator[Tensor]:
    """log p(x | z_j) with z_j ~ p(z), k per example of x, in blocks: (S, B) each.

    The codes come from the model's prior_draws (latent.py; ancestral for a hierarchy). A mixture
    prior picks each draw's component with a second noise stream of its own key."""
    samples_per_pass = samples_per_pass or decode_samples(model, len(x))
    prior = model.prior_draws()
    chunks = noise_chunks(model, start, len(x), k, (seed, "naive", split), block, x.device)
    choices = noise_chunks(model, start, len(x), k, (seed, "naive-component", split), block,
                           x.device) if prior.needs_choice else None
    for eps in chunks:
        choice = None if choices is None else next(choices)[..., 0]  # (S, B)
        code = prior.code(eps, choice)  # (S, B, code_dim)
        yield log_likelihood(model, code, x, samples_per_pass, y)  # (S, B)


def log_weights(model: VAE, x: Tensor, start: int, k: int, *, seed: int = 0,
                split: str = "test", proposal: str = "posterior",
                block: int | None = None, y: Tensor | None = None) -> Tensor:
    """All k log weights of every example of x, (k, B) float64: log p(x,z)/q(z|x) with z ~ q
    (proposal "posterior") or log p(x|z) with z ~ p(z) (proposal "prior", the naive estimator).
    For sweeps over k on a few examples; `evaluate` streams instead. y: labels (conditional)."""
    if proposal not in ("posterior", "prior"):
        raise ValueError(f"unknown proposal {proposal!r}: choose one of posterior, prior")
    block = block or sample_block(model, k, len(x))
    samples_per_pass = decode_samples(model, len(x))
    with torch.inference_mode():
        if proposal == "posterior":
            parts = [b.log_weight.double() for b in importance_blocks(
                model, x, start, k, seed=seed, split=split, block=block, y=y,
                samples_per_pass=samples_per_pass)]
        else:
            parts = [b.double() for b in prior_blocks(
                model, x, start, k, seed=seed, split=split, block=block, y=y,
                samples_per_pass=samples_per_pass)]
    return torch.cat(parts)  # (k, B)



# ------------------------------------------------------------------------------------------------
# Every figure of one batch of examples


SCALARS = ("log_px", "log_px_var", "log_px_ess", "elbo", "elbo_var", "elbo_gap_var",
           "reconstruction", "reconstruction_var", "kl", "kl_var",
           "log_px_naive", "log_px_naive_var", "log_px_naive_ess",
           *diagnostic_names("log_px", jackknife=True),
           *diagnostic_names("log_px_naive", jackknife=False))


def evaluate_batch(model: VAE, x: Tensor, start: int, *, k: int, seed: int, split: str,
                   naive: bool = True, block: int | None = None,
                   y: Tensor | None = None, samples_per_pass: int | None = None) -> Tensor:
    """Every per-example figure of x (B, *shape) as columns (B, len(SCALARS) + 2 D): SCALARS,
    then the posterior mean E_q[z] (D columns) and the KL per latent dimension (D columns).
    Model space: the pipeline's log-Jacobian is not added here. y (B,): labels of a
    conditional model (the figures are then of log p(x | y))."""
    block = block or sample_block(model, k, len(x))
    samples_per_pass = samples_per_pass or decode_samples(model, len(x))
    inference = model.infer(x, y)
    exact_kl = inference.exact_kl_per_dimension()  # (B, D) or None
    weights, likelihood, kl_sums = LogMeanExp(), MeanSums(), MeanSums()
    blocked, tail, drawn = BlockedWeights(k), TailWeights(k), 0  # diagnostics of the weights
    kl_dims = torch.zeros(len(x), model.latent_dim, dtype=torch.float64, device=x.device)
    posterior_mean = inference.mean_code()  # (B, D) or None
    if posterior_mean is not None:
        posterior_mean, z_sum = posterior_mean.double(), None
    else:  # a transformed Gaussian, a hierarchy: E_q[z] by the same samples
        z_sum = torch.zeros_like(kl_dims)
    for b in importance_blocks(model, x, start, k, seed=seed, split=split, block=block, y=y,
                               samples_per_pass=samples_per_pass, inference=inference):
        if exact_kl is not None:
            # The ELBO's summand with the KL in closed form: lower variance than log w.
            summand = b.log_likelihood.double() - exact_kl.double().sum(-1)  # (S, B)
        else:
            summand = b.log_weight
            kl_dims += b.kl_per_dim.double().sum(0)
            kl_sums.add(b.log_likelihood - b.log_weight)  # log q(z|x) - log p(z)
        weights.add(b.log_weight, companion=summand)
        blocked.add(b.log_weight, drawn)
        tail.add(b.log_weight)
        drawn += len(b.log_weight)
        likelihood.add(b.log_likelihood)
        if z_sum is not None:
            z_sum += b.z.double().sum(0)
    if exact_kl is not None:
        kl_dims = exact_kl.double()
        kl, kl_var = kl_dims.sum(-1), torch.zeros(len(x), dtype=torch.float64, device=x.device)
    else:
        kl_dims = kl_dims / k
        kl, kl_var = kl_sums.mean, kl_sums.variance_of_mean
    if z_sum is not None:
        posterior_mean = z_sum / k
    columns = {
        "log_px": weights.estimate, "log_px_var": weights.variance,
        "log_px_ess": weights.effective_sample_size,
        "elbo": weights.companion.mean, "elbo_var": weights.companion.variance_of_mean,
        "elbo_gap_var": weights.gap_variance,
        "reconstruction": likelihood.mean, "reconstruction_var": likelihood.variance_of_mean,
        "kl": kl, "kl_var": kl_var,
        **diagnostic_columns("log_px", blocked, tail, jackknife=True),
    }
    if naive:
        prior_weights = LogMeanExp()
        prior_blocked, prior_tail, drawn = BlockedWeights(k), TailWeights(k), 0
        for log_px_given_z in prior_blocks(model, x, start, k, seed=seed, split=split,
                                           block=block, y=y, samples_per_pass=samples_per_pass):
            prior_weights.add(log_px_given_z)
            prior_blocked.add(log_px_given_z, drawn)
            prior_tail.add(log_px_given_z)
            drawn += len(log_px_given_z)
        columns.update(log_px_naive=prior_weights.estimate,
                       log_px_naive_var=prior_weights.variance,
                       log_px_naive_ess=prior_weights.effective_sample_size,
                       **diagnostic_columns("log_px_naive", prior_blocked, prior_tail,
                                            jackknife=False))
    else:
        nan = torch.full((len(x),), math.nan, dtype=torch.float64, device=x.device)
        columns.update({name: nan for name in SCALARS if name.startswith("log_px_naive")})
    scalars = torch.stack([columns[name] for name in SCALARS], dim=1)  # (B, len(SCALARS))
    return torch.cat([scalars, posterior_mean, kl_dims], dim=1)

