"""The three distributions of a VAE, as `torch.distributions` objects.

    prior       p(z)          a module whose forward() returns the distribution
    posterior   q(z | x)      a module mapping encoder outputs to the distribution
    likelihood  p(x | z)      a module mapping decoder outputs to the distribution

Every distribution has its event dims set (`Independent`), so `log_prob` returns one number per
example. KL terms are exact wherever `kl_divergence` knows the pair and Monte Carlo otherwise.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Bernoulli,
    ContinuousBernoulli,
    Distribution,
    Independent,
    Normal,
    SigmoidTransform,
    TransformedDistribution,
    Uniform,
    kl_divergence,
)

# ------------------------------------------------------------------------------------------------
# Priors p(z)


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I): the usual prior; its KL to a Gaussian posterior is exact."""

    description = "standard normal"
    # Paths between two codes: spherical first (the default). In high dimensions a Gaussian's mass
    # lies near the sphere of radius sqrt(D); a straight line cuts inside it, through codes the
    # prior almost never produces (White 2016, "Sampling generative networks").
    interpolation_modes = ("spherical", "linear")

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("scale", torch.ones(latent_dim), persistent=False)

    def forward(self) -> Distribution:
        return Independent(Normal(self.loc, self.scale, validate_args=False), 1)

    def range(self, width: float = 3.0) -> tuple[float, float]:
        """The interval a control over one latent dimension should span (+- width sd)."""
        return -width, width


class UniformPrior(nn.Module):
    """p(z) = Uniform([0, 1]^D), the note's other easy prior; its KL has no closed form."""

    description = "uniform on the unit cube"
    interpolation_modes = ("linear",)  # a spherical path would leave the cube, the prior's support

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("low", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("high", torch.ones(latent_dim), persistent=False)

    def forward(self) -> Distribution:
        return Independent(Uniform(self.low, self.high, validate_args=False), 1)

    def range(self, width: float = 3.0) -> tuple[float, float]:
        """+- width standard deviations (1 / sqrt(12)) around the centre, within [0, 1]."""
        half = min(0.5, width / math.sqrt(12.0))
        return 0.5 - half, 0.5 + half


PRIORS = {"normal": StandardNormalPrior, "uniform": UniformPrior}


def build_prior(name: str, latent_dim: int) -> nn.Module:
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}: choose one of {', '.join(PRIORS)}")
    return PRIORS[name](latent_dim)


# ------------------------------------------------------------------------------------------------
# Posteriors q(z | x)


class GaussianPosterior(nn.Module):
    """q(z|x) = N(loc, diag(scale^2)) from 2*D encoder outputs (scale through softplus)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.params_per_example = 2 * latent_dim

    def forward(self, params: Tensor) -> Distribution:
        loc, raw_scale = params.chunk(2, dim=-1)  # (B, D) each
        return Independent(Normal(loc, F.softplus(raw_scale), validate_args=False), 1)


class SigmoidGaussianPosterior(GaussianPosterior):
    """q(z|x) = sigmoid(N(loc, diag(scale^2))): a Gaussian squashed into the unit cube.

    Used with the uniform prior, whose support the posterior must not leave. The sigmoid caches
    its last input, so `q.log_prob(q.rsample())` is computed from the pre-sigmoid sample and
    stays exact where the sigmoid saturates (inverting a float32 sigmoid near 1 is not).
    """

    def forward(self, params: Tensor) -> Distribution:
        gaussian = super().forward(params)
        return TransformedDistribution(gaussian, [SigmoidTransform(cache_size=1)],
                                       validate_args=False)


def build_posterior(prior_name: str, latent_dim: int) -> nn.Module:
    """The posterior family matching a prior's support."""
    return SigmoidGaussianPosterior(latent_dim) if prior_name == "uniform" \
        else GaussianPosterior(latent_dim)


def reparameterize(q: Distribution, eps: Tensor) -> Tensor:
    """The reparameterisation trick with the noise given: z = transform(loc + scale * eps).

    Identical to `q.rsample()` when eps ~ N(0, I) has the same shape, but the caller owns the
    noise, so training can replay it exactly (resume) and split it across processes.
    eps: (*sample_shape, B, D) -> z of the same shape.
    """
    base = base_normal(q)
    z = base.loc + base.scale * eps  # (..., B, D)
    for transform in (q.transforms if isinstance(q, TransformedDistribution) else []):
        z = transform(z)  # caches the pre-image, so q.log_prob(z) stays exact
    return z


def base_normal(q: Distribution) -> Normal:
    """The Gaussian inside a (sigmoid-transformed) Gaussian posterior: loc and scale per dim."""
    base = q.base_dist if isinstance(q, TransformedDistribution) else q
    if isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal):
        raise TypeError(f"expected a (transformed) Normal posterior, got {type(q).__name__}")
    return base


def per_dimension(d: Distribution) -> Distribution:
    """A factorised distribution over z (D,) seen one coordinate at a time.

    Drops the `Independent` over the last dim (keeping elementwise transforms, and their caches),
    so `log_prob`, `icdf` and `kl_divergence` give one number per coordinate: (..., D).
    """
    if isinstance(d, TransformedDistribution):
        return TransformedDistribution(per_dimension(d.base_dist), d.transforms,
                                       validate_args=False)
    if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1:
        return d.base_dist
    raise TypeError(f"expected an Independent distribution over the last dim, got {d}")


def draw_from_noise(p: Distribution, eps: Tensor) -> Tensor:
    """A draw from p made of standard normal noise eps (*sample_shape, D) the caller owns.

    (Transformed) Normals use the reparameterisation, loc + scale * eps; other distributions
    (the uniform prior) use the inverse CDF, p.icdf(Phi(eps)). Either way z ~ p exactly, and an
    estimator can fix its noise per example (see randomness.per_example_normal).
    """
    base = p.base_dist if isinstance(p, Independent) else p
    if isinstance(p, TransformedDistribution) or isinstance(base, Normal):
        return reparameterize(p, eps)
    return base.icdf(Normal(0.0, 1.0).cdf(eps))  # (*sample_shape, D)


def per_dimension(p: Distribution) -> Distribution:
    """The same distribution with its latent dimension as a batch dimension: log_prob gives one
    number per dimension (an Independent over one dim, possibly inside elementwise transforms)."""
    if isinstance(p, Independent) and p.reinterpreted_batch_ndims == 1:
        return p.base_dist
    if isinstance(p, TransformedDistribution):
        return TransformedDistribution(per_dimension(p.base_dist), p.transforms,
                                       validate_args=False)
    raise TypeError(f"per_dimension needs an Independent distribution over one dim, got {p}")


def log_ratio_per_dimension(q: Distribution, prior: Distribution, z: Tensor,
                            eps: Tensor) -> Tensor:
    """log q(z_d | x) - log p(z_d) per latent dimension (..., B, D) at z = reparameterize(q, eps).

    For a Gaussian posterior and a standard normal prior it is (z^2 - eps^2) / 2 - log sigma_d,
    read off the noise that made z: 5 passes over the samples instead of the 14 of two
    Normal.log_prob calls (importance sampling evaluates it for every sample). Other pairs use
    the distributions' own log_prob.
    """
    base = q.base_dist if isinstance(q, Independent) else None
    prior_base = prior.base_dist if isinstance(prior, Independent) else None
    if isinstance(base, Normal) and isinstance(prior_base, Normal) and \
            bool((prior_base.loc == 0).all() and (prior_base.scale == 1).all()):
        return 0.5 * (z.square() - eps.square()) - base.scale.log()  # (..., B, D)
    return per_dimension(q).log_prob(z) - per_dimension(prior).log_prob(z)  # (..., B, D)


def posterior_mean_code(q: Distribution) -> Tensor:
    """A point code for x: the posterior mean for Gaussians, the squashed mean in the cube."""
    if isinstance(q, TransformedDistribution):
        code = q.base_dist.mean
        for transform in q.transforms:
            code = transform(code)
        return code
    return q.mean


def kl_or_estimate(q: Distribution, p: Distribution, z: Tensor) -> Tensor:
    """KL(q || p) per example: exact when registered, else the one-sample estimate at z ~ q."""
    try:
        return kl_divergence(q, p)  # (B,)
    except NotImplementedError:
        return q.log_prob(z) - p.log_prob(z)  # (..., B), unbiased


def has_exact_kl(q: Distribution, p: Distribution) -> bool:
    try:
        kl_divergence(q, p)
        return True
    except NotImplementedError:
        return False


# ------------------------------------------------------------------------------------------------
# Likelihoods p(x | z)


class BernoulliLikelihood(nn.Module):
    """Independent Bernoulli pixels from logits: a probability mass for binary data."""

    description = "Bernoulli"
    discrete = True

    def __init__(self, event_shape: tuple[int, ...]):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.params_shape = self.event_shape

    def forward(self, logits: Tensor) -> Distribution:
        return Independent(Bernoulli(logits=logits, validate_args=False), len(self.event_shape))

    def scorer(self, x: Tensor, bias: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """log p(x | logits + bias) as a function of the logits, for fixed examples x
        (B, *event_shape): score(logits (..., B, *event_shape)) -> (..., B), equal to
        self(logits + bias).log_prob(x). For evaluation: score works in place, overwriting the
        logits it is given (a decoder's fresh output, or a buffer), and records no gradient.

        For x in {0, 1}, log Bernoulli(x; sigmoid(l)) = -softplus((1 - 2x) l): the sign and the
        bias take one fused pass over the logits, the softplus one more (the transcendental
        pass that cannot be avoided), and no sums of large terms cancel. What depends on x
        alone is prepared once, for estimators that score many batches of codes of the same
        examples. Other x use the distribution's formula.
        """
        if not bool(((x == 0) | (x == 1)).all()):
            return lambda logits: self(logits if bias is None else logits + bias.view(
                self.event_shape)).log_prob(x)
        signs = 1 - 2 * x  # (B, *event_shape): +1 where x = 0, -1 where x = 1
        signed_bias = None if bias is None else bias.view(self.event_shape) * signs
        event_dims = len(self.event_shape)

        def score(logits: Tensor) -> Tensor:
            with torch.no_grad():
                if signed_bias is None:
                    signed = logits.mul_(signs)  # (..., B, *event_shape)
                else:
                    signed = torch.addcmul(signed_bias, logits, signs, out=logits)
                # log(1 + e^v) in place (beyond v = 20 it is v, within float32 rounding)
                softplus = torch.ops.aten.softplus.out(signed, 1, 20, out=signed)
                return softplus.flatten(-event_dims).sum(-1).neg_()  # (..., B)

        return score

    def check_support(self, x: Tensor) -> str | None:
        if not bool(((x == 0) | (x == 1)).all()):
            return "the Bernoulli likelihood scores values 0 and 1 only"
        return None


class ContinuousBernoulliLikelihood(nn.Module):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on [0, 1]."""

    description = "continuous Bernoulli density"
    discrete = False

    def __init__(self, event_shape: tuple[int, ...]):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.params_shape = self.event_shape

    def forward(self, logits: Tensor) -> Distribution:
        return Independent(ContinuousBernoulli(logits=logits, validate_args=False),
                           len(self.event_shape))

    def check_support(self, x: Tensor) -> str | None:
        if not bool(((x >= 0) & (x <= 1)).all()):
            return "the continuous Bernoulli likelihood scores values in [0, 1] only"
        return None


class GaussianLikelihood(nn.Module):
    """N(decoder(z), diag(sigma^2)) with sigma fixed, or learned per data dimension."""

    description = "Gaussian density"
    discrete = False

    def __init__(self, event_shape: tuple[int, ...], scale: float | None = None):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.params_shape = self.event_shape
        self.learned = scale is None
        if self.learned:
            # log sigma starts at log 0.1: data are scaled to unit range, where 0.1 is a sane
            # first guess; the gradient moves it quickly.
            self.log_scale = nn.Parameter(torch.full(self.event_shape, math.log(0.1)))
        else:
            self.register_buffer("log_scale", torch.full(self.event_shape, math.log(scale)))

    def forward(self, loc: Tensor) -> Distribution:
        return Independent(Normal(loc, self.log_scale.exp(), validate_args=False),
                           len(self.event_shape))

    def check_support(self, x: Tensor) -> str | None:
        if not bool(torch.isfinite(x).all()):
            return "the Gaussian likelihood needs finite values"
        return None


def build_likelihood(name: str, event_shape: tuple[int, ...],
                     gaussian_scale: float | None = None) -> nn.Module:
    if name == "bernoulli":
        return BernoulliLikelihood(event_shape)
    if name == "continuous-bernoulli":
        return ContinuousBernoulliLikelihood(event_shape)
    if name == "gaussian":
        return GaussianLikelihood(event_shape, gaussian_scale)
    raise ValueError(f"unknown likelihood {name!r}: choose one of bernoulli, "
                     "continuous-bernoulli, gaussian")

