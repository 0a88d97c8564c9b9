"""Bounds of every example of a split with fixed noise: the ELBO's terms, the IWAE bound, and the
KL of each latent dimension (what training's test figures and the latent-space tools use)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import kl_divergence

from ..data import Pipeline
from ..distributed import DistContext
from ..distributions import factorised, per_dimension, reparameterize
from ..model import VAE
from ..objectives import elbo_terms, iwae_terms
from ..randomness import fixed_normal
from .chunks import CHUNK_ELEMENTS, decoded_elements_per_sample, map_examples


MARGINAL_DRAWS = 256  # draws per example for a flow's moment-matched coordinate marginals


def elbo_per_example(model: VAE, raw: Tensor, pipeline: Pipeline, *, split: str = "test",
                     seed: int = 0, batch_size: int | None = None,
                     device: torch.device | None = None,
                     dist: DistContext | None = None, labels: Tensor | None = None) -> Tensor:
    """(N, 2) float64: reconstruction and KL of every example, one fixed z sample each.

    labels (N,): the class of each example, for a conditional model (the ELBO of log p(x|y)).
    batch_size: examples per chunk; default: up to 1000, as many as keep a chunk's decoded
    tensors within CHUNK_ELEMENTS (a 256-way categorical on 3 x 48 x 48 images decodes 1.8
    million numbers an example: 1000 at once took 24 GB). The figures do not depend on it.
    """
    device = device or next(model.parameters()).device
    if batch_size is None:
        batch_size = max(1, min(1000, CHUNK_ELEMENTS // decoded_elements_per_sample(model)))

    def terms(x: Tensor, start: int, stop: int) -> Tensor:
        eps = fixed_normal((model.latent_dim,), start, stop, (seed, "elbo-eps", split))
        y = None if labels is None else labels[start:stop].to(device)
        result = elbo_terms(model, x, eps.to(device), y)
        return torch.stack([result.reconstruction, result.kl], dim=1)  # (b, 2)

    return map_examples(terms, raw, pipeline, split, batch_size, device, dist, outputs=2)


def iwae_per_example(model: VAE, raw: Tensor, pipeline: Pipeline, samples: int, *,
                     split: str = "test", seed: int = 0, device: torch.device | None = None,
                     dist: DistContext | None = None, labels: Tensor | None = None) -> Tensor:
    """(N,) float64: the IWAE bound with `samples` z per example (Burda et al. 2016), noise
    fixed per example index; chunks hold about 20,000 samples of z so memory stays bounded."""
    device = device or next(model.parameters()).device
    batch_size = max(1, 20_000 // samples)

    def bound(x: Tensor, start: int, stop: int) -> Tensor:
        eps = fixed_normal((samples, model.latent_dim), start, stop, (seed, "iwae-eps", split))
        y = None if labels is None else labels[start:stop].to(device)
        return iwae_terms(model, x, eps.to(device), y).bound  # (b,)

    return map_examples(bound, raw, pipeline, split, batch_size, device, dist).squeeze(1)


def skip_bounds_per_example(model: VAE, raw: Tensor, pipeline: Pipeline,
                            samples: int, *, split: str = "test", seed: int = 0,
                            device: torch.device | None = None,
                            dist: DistContext | None = None) -> Tensor:
    """(N, L) float64 for a model of L latent groups (its inference's `draw` takes
    inferred_groups, latent.py): the ELBO of every example (column 0) and, in
    column k = 1 .. L-1, the bound L^{>k} of Havtorn et al. 2021 in which the lowest k groups
    are drawn from their priors given the groups above instead of from q:

        L^{>k}(x) = E_{q(z_top | x) p(z_low | z_top)}[log p(x | z) - sum_top KL(q || p)]

    The lowest groups then hold no information about x, so L^{>k} scores x by what the upper
    groups' codes explain of it. Each column is the mean of `samples` one-draw estimates, not an
    importance-weighted bound (which would tend to log p(x) and wash the difference out); every
    column uses the same noise per example (fixed by seed and example index), so the
    differences between columns have a small Monte Carlo error.
    """
    groups = len(model.latent_groups)
    if groups < 2:
        raise ValueError("bounds that skip latent groups need a model of at least 2 latent "
                         "groups (vaekit train --latent-groups)")
    device = device or next(model.parameters()).device
    batch_size = max(1, 20_000 // samples)

    def bounds(x: Tensor, start: int, stop: int) -> Tensor:
        eps = fixed_normal((samples, model.latent_dim), start, stop, (seed, "skip-eps", split))
        eps = eps.transpose(0, 1).to(device)  # (S, b, D)
        inference = model.infer(x)
        columns = []
        for skipped in range(groups):
            draw = inference.draw(eps, inferred_groups=groups - skipped)
            bound = model.decode(draw.code).log_prob(x) - draw.kl()  # (S, b)
            columns.append(bound.mean(0))  # (b,)
        return torch.stack(columns, dim=1)  # (b, L)

    return map_examples(bounds, raw, pipeline, split, batch_size, device, dist, outputs=groups)



def kl_per_dimension(model: VAE, raw: Tensor, pipeline: Pipeline, *, split: str = "test",
                     seed: int = 0, samples: int = 16, batch_size: int = 1000,
                     device: torch.device | None = None,
                     dist: DistContext | None = None) -> Tensor:
    """(N, D) float64: KL(q(z_d | x) || p(z_d)) of every example and latent dimension, in nats.

    Where the posterior factorises over dimensions, the rows sum to each example's KL. Exact
    where `kl_divergence` knows the pair (Gaussian posterior, normal prior); otherwise the mean
    of `samples` reparameterised draws per example, fixed by (seed, example index). A posterior
    that does not factorise (full covariance, a flow) gives the KL of each coordinate's marginal
    q(z_d | x), a Gaussian with the marginal's mean and variance (exact for the full covariance,
    matched to the draws for a flow): the rows then leave out what the coordinates' dependence
    adds to the total. Averaged over examples it says how much each dimension is used: near 0,
    q(z_d | x) is the prior whatever x is, and z_d carries no information (an inactive unit).
    """
    device = device or next(model.parameters()).device
    prior = per_dimension(model.prior)  # batch (D,)
    dims = model.latent_dim

    def noise(start: int, stop: int, count: int) -> Tensor:
        eps = fixed_normal((count, dims), start, stop, (seed, "kl-dim-eps", split))
        return eps.transpose(0, 1).to(device)  # (S, b, D)

    def kl(x: Tensor, start: int, stop: int) -> Tensor:
        posterior = model.encode(x)
        if not factorised(posterior):
            # a moment-matched marginal needs more draws than a mean of log-ratios: 16 draws
            # would bias an unused coordinate's KL to about 0.07 nats, 256 to about 0.004
            draws = noise(start, stop, max(samples, MARGINAL_DRAWS))
            marginals = posterior.coordinate_marginals(draws)  # batch (b, D)
            return kl_divergence(marginals, prior)  # (b, D)
        q = per_dimension(posterior)  # batch (b, D)
        try:
            return kl_divergence(q, prior)  # (b, D)
        except NotImplementedError:
            z = reparameterize(q, noise(start, stop, samples))  # (S, b, D)
            return (q.log_prob(z) - prior.log_prob(z)).mean(0)  # (b, D)

    return map_examples(kl, raw, pipeline, split, batch_size, device, dist, outputs=dims)
