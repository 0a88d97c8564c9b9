"""The three distributions of a VAE, as `torch.distributions` objects.

    prior       p(z)          a module whose forward() returns the distribution
    posterior   q(z | x)      a module mapping encoder outputs to the distribution
    likelihood  p(x | z)      a module mapping decoder outputs to the distribution

Every distribution has its event dims set (`Independent`), so `log_prob` returns one number per
example. KL terms are exact wherever `kl_divergence` knows the pair and Monte Carlo otherwise.
"""

from __future__ import annotations

import math

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

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("low", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("high", torch.ones(latent_dim), persistent=False)

    def forward(self) -> Distribution:
        return Independent(Uniform(self.low, self.high, validate_args=False), 1)

    def range(self, width: float = 3.0) -> tuple[float, float]:
        return 0.0, 1.0


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
    transforms = []
    base = q
    if isinstance(base, TransformedDistribution):
        transforms = base.transforms
        base = base.base_dist
    if isinstance(base, Independent):
        base = base.base_dist
    if not isinstance(base, Normal):
        raise TypeError(f"reparameterize needs a (transformed) Normal posterior, got {type(q)}")
    z = base.loc + base.scale * eps  # (..., B, D)
    for transform in transforms:
        z = transform(z)  # caches the pre-image, so q.log_prob(z) stays exact
    return z


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

