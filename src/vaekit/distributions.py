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
    Categorical,
    ContinuousBernoulli,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    TransformedDistribution,
    Uniform,
    constraints,
    kl_divergence,
)
from torch.distributions.utils import broadcast_all

from .names import (  # noqa: F401  (FACTORISED_PRIORS, LIKELIHOODS: re-exported names)
    FACTORISED_PRIORS,
    LIKELIHOODS,
    PRIORS,
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


class DiagonalGaussianMixture(MixtureSameFamily):
    """sum_k pi_k N(mu_k, diag(sigma_k^2)) over R^D: K components, no batch dimensions.

    A MixtureSameFamily whose log_prob is two matrix products instead of a (N, K, D) tensor:
    sum_d (z_d - mu_kd)^2 / sigma_kd^2 = z^2 . (1/sigma_k^2) - 2 z . (mu_k/sigma_k^2) + const_k.
    The expansion is computed in float64, where its cancellation stays below 1e-6 nats for
    components as sharp as sigma = 1e-4; the VampPrior's 500 components over 50 dimensions then
    cost about as much as one layer of the decoder, not twenty.
    """

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor):
        if loc.dim() != 2:
            raise ValueError(f"loc must be (components, dims), got {tuple(loc.shape)}")
        super().__init__(Categorical(logits=logits, validate_args=False),
                         Independent(Normal(loc, scale, validate_args=False), 1),
                         validate_args=False)

    def log_prob(self, z: Tensor) -> Tensor:
        normal = self.component_distribution.base_dist
        loc, scale = normal.loc.double(), normal.scale.double()  # (K, D)
        precision = scale.pow(-2)  # (K, D)
        flat = z.reshape(-1, z.shape[-1]).double()  # (N, D)
        squared = flat.pow(2) @ precision.T - 2 * flat @ (loc * precision).T \
            + (loc.pow(2) * precision).sum(-1)  # (N, K)
        log_normaliser = -scale.log().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)  # (K,)
        log_weights = torch.log_softmax(self.mixture_distribution.logits.double(), dim=-1)  # (K,)
        joint = -0.5 * squared + log_normaliser + log_weights  # (N, K)
        return torch.logsumexp(joint, dim=-1).to(z.dtype).reshape(z.shape[:-1])  # (...)


class MixturePrior(nn.Module):
    """p(z) = sum_k pi_k N(mu_k, diag(sigma_k^2)) with learned weights, means and scales.

    A prior with several modes can match the aggregate posterior better than one Gaussian
    (Dilokthanakul et al. 2016; Tomczak & Welling 2018 compare it with the VampPrior). Its KL to
    a Gaussian posterior has no closed form and is estimated by Monte Carlo.
    """

    default_components = 10

    def __init__(self, latent_dim: int, components: int | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        components = components or self.default_components
        # means drawn from N(0, I) so the components start apart; unit scales, equal weights
        self.loc = nn.Parameter(torch.randn(components, latent_dim))  # (K, D)
        self.log_scale = nn.Parameter(torch.zeros(components, latent_dim))  # (K, D)
        self.logits = nn.Parameter(torch.zeros(components))  # (K,)

    def forward(self) -> Distribution:
        return DiagonalGaussianMixture(self.logits, self.loc, self.log_scale.exp())

    def range(self, width: float = 3.0) -> tuple[float, float]:
        return _mixture_range(self(), width)


class VampPrior(nn.Module):
    """p(z) = (1/K) sum_k q(z | u_k): the posterior at K learned pseudo-inputs u_k.

    Tomczak & Welling 2018 ("VAE with a VampPrior"). The prior runs the model's own encoder,
    which it does not own: the VAE attaches its `encode` after construction, so the encoder's
    weights are registered once (under `encoder.`) and this module holds only the pseudo-inputs.
    The pseudo-inputs start near 0.05, the paper's default; starting them at training examples
    (its other option) made a tanh network's posterior collapse on Fashion-MNIST.
    """

    default_components = 500  # the paper's K for MNIST

    def __init__(self, latent_dim: int, data_shape: tuple[int, ...],
                 components: int | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        components = components or self.default_components
        # the paper's initialisation, N(0.05, 0.01^2)
        self.pseudo_inputs = nn.Parameter(0.05 + 0.01 * torch.randn(components, *data_shape))
        self._encode = None  # set by attach(): a plain attribute, not a submodule

    @property
    def components(self) -> int:
        return len(self.pseudo_inputs)

    def attach(self, encode) -> None:
        """Give the prior the function x -> q(z|x) it mixes (the VAE's encode)."""
        self._encode = encode

    def forward(self) -> Distribution:
        if self._encode is None:
            raise RuntimeError("the VampPrior needs the model's encoder: build the model with "
                               "build_vae, or call prior_module.attach(model.encode)")
        components = self._encode(self.pseudo_inputs)  # batch (K,), event (D,)
        normal = components.base_dist  # Normal, loc and scale (K, D)
        logits = torch.zeros(self.components, device=self.pseudo_inputs.device)  # equal weights
        return DiagonalGaussianMixture(logits, normal.loc, normal.scale)

    def range(self, width: float = 3.0) -> tuple[float, float]:
        return _mixture_range(self(), width)


def _mixture_range(mixture: MixtureSameFamily, width: float) -> tuple[float, float]:
    """The interval covering every component's mean +- width standard deviations."""
    with torch.no_grad():
        normal = mixture.component_distribution.base_dist
        return (float((normal.loc - width * normal.scale).min()),
                float((normal.loc + width * normal.scale).max()))


PRIOR_FAMILIES = {"normal": StandardNormalPrior, "uniform": UniformPrior,
                  "mixture": MixturePrior, "vamp": VampPrior}
assert tuple(PRIOR_FAMILIES) == PRIORS


def build_prior(name: str, latent_dim: int, components: int | None = None,
                data_shape: tuple[int, ...] | None = None) -> nn.Module:
    """The prior module `name`; `components` sets K of mixture and vamp (None: their default)."""
    if name not in PRIOR_FAMILIES:
        raise ValueError(f"unknown prior {name!r}: choose one of {', '.join(PRIORS)}")
    if name == "mixture":
        return MixturePrior(latent_dim, components)
    if name == "vamp":
        if data_shape is None:
            raise ValueError("the vamp prior needs data_shape (the shape of its pseudo-inputs)")
        return VampPrior(latent_dim, tuple(data_shape), components)
    return PRIOR_FAMILIES[name](latent_dim)


# ------------------------------------------------------------------------------------------------
# Drawing, KL and codes for any distribution (the posterior families are in posteriors.py)


def reparameterize(q: Distribution, eps: Tensor) -> Tensor:
    """The reparameterisation trick with the noise given: z = transform(loc + scale * eps).

    Identical to `q.rsample()` when eps ~ N(0, I) has the same shape, but the caller owns the
    noise, so training can replay it exactly (resume) and split it across processes. A posterior
    family draws for itself (`draw`); plain torch (transformed) Normals, such as the standard
    normal prior, are drawn here. eps: (*sample_shape, B, D) -> z of the same shape.
    """
    if hasattr(q, "draw"):
        return q.draw(eps)
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
    so `log_prob`, `icdf` and `kl_divergence` give one number per coordinate: (..., D). A flow or
    a full covariance does not factorise: TypeError.
    """
    if not factorised(d):
        raise TypeError(f"{type(d).__name__} does not factorise over the latent dimensions")
    if isinstance(d, TransformedDistribution):
        return TransformedDistribution(per_dimension(d.base_dist), d.transforms,
                                       validate_args=False)
    if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1:
        return d.base_dist
    raise TypeError(f"expected an Independent distribution over the last dim, got {d}")


def factorised(d: Distribution) -> bool:
    """Whether d is a product over the last dimension: an Independent over one dim, possibly
    under elementwise transforms (a sigmoid). A flow or a full covariance is not."""
    if isinstance(d, TransformedDistribution):
        return all(t.domain.event_dim == 0 for t in d.transforms) and factorised(d.base_dist)
    return isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1


def factorises_against(q: Distribution, p: Distribution) -> bool:
    """Whether log q - log p splits into one term per latent dimension (what free bits per
    dimension and the per-dimension KL need). A posterior family answers for itself; for plain
    torch distributions, both must factorise over the last dimension."""
    if hasattr(q, "factorises_against"):
        return q.factorises_against(p)
    return factorised(q) and factorised(p)


def draw_from_noise(p: Distribution, eps: Tensor, choice: Tensor | None = None) -> Tensor:
    """A draw from p made of standard normal noise eps (*sample_shape, D) the caller owns.

    (Transformed) Normals use the reparameterisation, loc + scale * eps; other distributions
    (the uniform prior) use the inverse CDF, p.icdf(Phi(eps)). Either way z ~ p exactly, and an
    estimator can fix its noise per example (see randomness.per_example_normal). A mixture (the
    mixture and vamp priors) needs one more normal per draw, choice (*sample_shape), that picks
    the component by the inverse CDF of the mixing weights at Phi(choice).
    """
    if isinstance(p, MixtureSameFamily):
        if choice is None:
            raise ValueError("a draw from a mixture needs `choice` noise to pick the component")
        weights = p.mixture_distribution.probs  # (K,)
        edges = weights.cumsum(0)[:-1].contiguous()  # (K - 1,) upper edges but the last
        u = Normal(0.0, 1.0).cdf(choice).contiguous()  # (*sample_shape,) uniform on (0, 1)
        component = torch.searchsorted(edges, u)  # (*sample_shape,) index k with prob pi_k
        normal = p.component_distribution.base_dist  # loc, scale (K, D)
        return normal.loc[component] + normal.scale[component] * eps  # (*sample_shape, D)
    base = p.base_dist if isinstance(p, Independent) else p
    if isinstance(p, TransformedDistribution) or isinstance(base, Normal):
        return reparameterize(p, eps)
    return base.icdf(Normal(0.0, 1.0).cdf(eps))  # (*sample_shape, D)


def draw_at_temperature(p: Distribution, n: int, temperature: float = 1.0,
                        generator: torch.Generator | None = None) -> Tensor:
    """n draws from the prior p with its noise scaled by `temperature`, for every prior. (n, D)

    One definition for all priors: z = draw_from_noise(p, T * eps, choice), eps ~ N(0, I), the
    component choice (mixtures) left untempered. What T means for each:
      normal             z ~ N(0, T^2 I): the prior's scale times T (NVAE, VDVAE);
      uniform            z_d = Phi(T eps_d): T = 1 is the uniform cube; T < 1 piles the draws
                         towards the centre 0.5 (T -> 0: the centre), T > 1 towards the faces;
      mixture, vamp      component k picked with its weight pi_k, then z = mu_k + T sigma_k eps:
                         every component's scale times T, its mean and weight kept.
    T = 1 is exactly p and T = 0 its centre (the component means for mixtures). The noise comes
    from `generator` (CPU) in one draw, so the result depends on (seed, n) alone.
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"a temperature must be a number >= 0, got {temperature}")
    dims = p.event_shape[-1]
    eps = torch.randn(n, dims, generator=generator)  # (n, D)
    choice = torch.randn(n, generator=generator) if isinstance(p, MixtureSameFamily) else None
    device = p.mean.device
    return draw_from_noise(p, temperature * eps.to(device),
                           None if choice is None else choice.to(device))  # (n, D)


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
    """A point code for x: the posterior family's own (`point_code`: the mean of a Gaussian, the
    squashed mean in the cube); for plain torch distributions, the mean (through transforms)."""
    if hasattr(q, "point_code"):
        return q.point_code()
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


def exact_kl_per_dimension(q: Distribution, p: Distribution) -> Tensor | None:
    """KL(q || p) per latent dimension (B, D) where torch knows it in closed form, else None."""
    try:
        return kl_divergence(per_dimension(q), per_dimension(p))
    except (NotImplementedError, TypeError):
        return None


def kl_per_dimension(q: Distribution, p: Distribution, z: Tensor) -> Tensor:
    """KL(q(z_d|x) || p(z_d)) of each latent dimension d; sums to the KL of kl_or_estimate.

    Defined where both distributions factorise over dimensions: exact for a diagonal Gaussian
    against a diagonal Gaussian, the one-sample estimate at z ~ q for a squashed Gaussian against
    the uniform prior. (B, D), or (..., B, D) for the estimate.
    """
    if isinstance(q, Independent) and isinstance(p, Independent) \
            and isinstance(q.base_dist, Normal) and isinstance(p.base_dist, Normal):
        return kl_divergence(q.base_dist, p.base_dist)  # (B, D)
    if isinstance(q, TransformedDistribution) and isinstance(p, Independent) \
            and isinstance(p.base_dist, Uniform) and len(q.transforms) == 1:
        transform = q.transforms[0]
        pre_image = transform.inv(z)  # cached from reparameterize: exact where sigmoid saturates
        log_q = q.base_dist.base_dist.log_prob(pre_image) \
            - transform.log_abs_det_jacobian(pre_image, z)  # (..., B, D)
        return log_q - p.base_dist.log_prob(z)  # (..., B, D)
    raise ValueError(f"KL per dimension needs a prior that factorises over dimensions "
                     f"({', '.join(FACTORISED_PRIORS)}), got {type(p).__name__}")


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


# --- 8-bit levels ---------------------------------------------------------------------------

LEVELS = 256  # grey levels of an 8-bit image; the data pipeline scales level k to k / 255
MIN_LOG_SCALE = -8.0  # a logistic scale floor of about a tenth of a level's width (as PixelCNN++)


class GreyLevels(constraints.Constraint):
    """The values k / (L - 1), k = 0 .. L - 1: 8-bit levels scaled to [0, 1]."""

    is_discrete = True
    event_dim = 0

    def __init__(self, levels: int = LEVELS):
        super().__init__()
        self.levels = levels

    def check(self, value: Tensor) -> Tensor:
        scaled = value * (self.levels - 1)
        return (value >= 0) & (value <= 1) & ((scaled - scaled.round()).abs() < 1e-3)


def _level_values(levels: int, like: Tensor) -> Tensor:
    return torch.arange(levels, dtype=like.dtype, device=like.device) / (levels - 1)  # (L,)


class DiscretizedLogistic(Distribution):
    """A logistic density integrated over the bins of L grey levels (Salimans et al. 2017).

    Values are the levels k / (L - 1) of [0, 1]. Level k owns the bin of half-width
    h = 1 / (2 (L - 1)) around it, and the end bins reach to -inf and +inf, so the L masses sum
    to one exactly:

        P(k) = sigmoid((k / (L-1) + h - loc) / scale) - sigmoid((k / (L-1) - h - loc) / scale)
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_enumerate_support = True

    def __init__(self, loc: Tensor, scale: Tensor, levels: int = LEVELS,
                 validate_args: bool | None = None):
        self.loc, self.scale = broadcast_all(loc, scale)
        self.levels = levels
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return GreyLevels(self.levels)

    def expand(self, batch_shape, _instance=None):
        return DiscretizedLogistic(self.loc.expand(batch_shape), self.scale.expand(batch_shape),
                                   self.levels, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        half_bin = 0.5 / (self.levels - 1)
        upper = (value + half_bin - self.loc) / self.scale
        lower = (value - half_bin - self.loc) / self.scale
        # log(sigmoid(upper) - sigmoid(lower)) without cancellation, for any loc and scale:
        # = upper - softplus(upper) - softplus(lower) + log(1 - exp(lower - upper))
        interior = upper - F.softplus(upper) - F.softplus(lower) \
            + torch.log(-torch.expm1(lower - upper))
        first = -F.softplus(-upper)  # log sigmoid(upper): the bin reaching down to -inf
        last = -F.softplus(lower)  # log(1 - sigmoid(lower)): the bin reaching up to +inf
        return torch.where(value < half_bin, first,
                           torch.where(value > 1 - half_bin, last, interior))

    @property
    def mean(self) -> Tensor:
        # E[K] = sum_{k >= 1} P(K >= k)
        #      = sum_{j=0}^{L-2} sigmoid((loc - (j + 1/2) / (L-1)) / scale),
        # summed in chunks of levels so large images do not need L times their memory
        edges = (torch.arange(self.levels - 1, dtype=self.loc.dtype, device=self.loc.device)
                 + 0.5) / (self.levels - 1)  # (L - 1,)
        total = torch.zeros_like(self.loc)
        loc, scale = self.loc.unsqueeze(-1), self.scale.unsqueeze(-1)  # (..., 1)
        for chunk in edges.split(32):
            total = total + torch.sigmoid((loc - chunk) / scale).sum(-1)
        return total / (self.levels - 1)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        """A logistic draw rounded to the nearest level: exactly the masses of log_prob."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            tiny = torch.finfo(self.loc.dtype).eps
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
            u = u.clamp(tiny, 1 - tiny)
            x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
            return (x * (self.levels - 1)).round().clamp(0, self.levels - 1) / (self.levels - 1)

    def enumerate_support(self, expand: bool = True) -> Tensor:
        values = _level_values(self.levels, self.loc).view(-1, *(1,) * len(self.batch_shape))
        return values.expand(-1, *self.batch_shape) if expand else values  # (L, *batch)


class LevelCategorical(Categorical):
    """A free probability for each of L grey levels k / (L - 1): a 256-way softmax per pixel
    (van den Oord et al. 2016, PixelRNN). Values are levels in [0, 1], not class indices."""

    def __init__(self, logits: Tensor, validate_args: bool | None = None):
        super().__init__(logits=logits, validate_args=validate_args)
        self.levels = logits.shape[-1]

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return GreyLevels(self.levels)

    def expand(self, batch_shape, _instance=None):
        return LevelCategorical(self.logits.expand(*batch_shape, self.levels), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        index = (value * (self.levels - 1)).round().long().unsqueeze(-1)  # (..., 1)
        index, log_pmf = torch.broadcast_tensors(index, self.logits)  # views, no copies
        return log_pmf.gather(-1, index[..., :1]).squeeze(-1)

    @property
    def mean(self) -> Tensor:
        return (self.probs * _level_values(self.levels, self.logits)).sum(-1)

    @property
    def variance(self) -> Tensor:
        values = _level_values(self.levels, self.logits)
        return (self.probs * values ** 2).sum(-1) - self.mean ** 2

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        return super().sample(sample_shape).to(self.logits.dtype) / (self.levels - 1)

    def enumerate_support(self, expand: bool = True) -> Tensor:
        return super().enumerate_support(expand).to(self.logits.dtype) / (self.levels - 1)


class DiscretizedLogisticMixture(Distribution):
    """Images (C, H, W) whose pixels each follow a mixture of M discretised logistics.

    Salimans et al. 2017 (PixelCNN++): a pixel picks component m with probability pi_m, and its
    C channels are then independent discretised logistics with that component's locs and
    scales, so one component shared by the channels carries their correlation. (PixelCNN++ also
    makes green and blue means linear in red, an autoregressive device left out here, which
    keeps the mean exact.)

    logits (..., M, H, W); loc, scale (..., M, C, H, W). Batch shape (...), event (C, H, W).
    """

    arg_constraints = {"logits": constraints.real, "loc": constraints.real,
                       "scale": constraints.positive}

    def __init__(self, logits: Tensor, loc: Tensor, scale: Tensor, levels: int = LEVELS,
                 validate_args: bool | None = None):
        self.logits, self.loc, self.scale, self.levels = logits, loc, scale, levels
        super().__init__(logits.shape[:-3], loc.shape[-3:], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=3)
    def support(self):
        return constraints.independent(GreyLevels(self.levels), 3)

    def _components(self) -> DiscretizedLogistic:
        return DiscretizedLogistic(self.loc, self.scale, self.levels, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        per_channel = self._components().log_prob(value.unsqueeze(-4))  # (..., M, C, H, W)
        joint = per_channel.sum(-3) + F.log_softmax(self.logits, dim=-3)  # (..., M, H, W)
        return torch.logsumexp(joint, dim=-3).sum((-2, -1))  # (...)

    @property
    def mean(self) -> Tensor:
        weights = F.softmax(self.logits, dim=-3).unsqueeze(-3)  # (..., M, 1, H, W)
        return (weights * self._components().mean).sum(-4)  # (..., C, H, W)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        m, (c, h, w) = self.logits.shape[-3], self.event_shape
        with torch.no_grad():
            logits = self.logits.expand(*shape, m, h, w).movedim(-3, -1)  # (*shape, H, W, M)
            component = Categorical(logits=logits, validate_args=False).sample()  # (*shape, H, W)
            index = component[..., None, None, :, :].expand(*shape, 1, c, h, w)
            loc = self.loc.expand(*shape, m, c, h, w).gather(-4, index).squeeze(-4)
            scale = self.scale.expand(*shape, m, c, h, w).gather(-4, index).squeeze(-4)
            return DiscretizedLogistic(loc, scale, self.levels, validate_args=False).sample()


def _logistic_scale(raw: Tensor) -> Tensor:
    # decoder outputs near 0 start each logistic at scale e^-2, about a seventh of [0, 1]
    return (raw - 2.0).clamp(min=MIN_LOG_SCALE).exp()


def _check_levels(x: Tensor, levels: int, name: str) -> str | None:
    if not bool(GreyLevels(levels).check(x).all()):
        return f"the {name} likelihood scores 8-bit levels k / {levels - 1} (k = 0..{levels - 1})"
    return None


class DiscretizedLogisticLikelihood(nn.Module):
    """One discretised logistic per 8-bit value (Salimans et al. 2017): a probability mass."""

    description = "discretised logistic"
    discrete = True

    def __init__(self, event_shape: tuple[int, ...], levels: int = LEVELS):
        super().__init__()
        self.event_shape, self.levels = tuple(event_shape), levels
        self.params_shape = (2, *self.event_shape)  # loc and log-scale of every value

    def forward(self, params: Tensor) -> Distribution:
        loc, raw_scale = params.unbind(-len(self.event_shape) - 1)  # (..., *event) each
        # + 0.5: decoder outputs near 0 start at mid-grey
        return Independent(DiscretizedLogistic(loc + 0.5, _logistic_scale(raw_scale), self.levels,
                                               validate_args=False), len(self.event_shape))

    def check_support(self, x: Tensor) -> str | None:
        return _check_levels(x, self.levels, "discretised logistic")


class LogisticMixtureLikelihood(nn.Module):
    """A mixture of M discretised logistics per pixel (Salimans et al. 2017): grey or RGB."""

    description = "mixture of discretised logistics"
    discrete = True
    default_components = 10  # PixelCNN++'s choice

    def __init__(self, event_shape: tuple[int, ...], components: int | None = None,
                 levels: int = LEVELS):
        super().__init__()
        if len(event_shape) != 3:
            raise ValueError(f"the logistic-mixture likelihood needs images (C, H, W), got "
                             f"{tuple(event_shape)}")
        self.event_shape, self.levels = tuple(event_shape), levels
        self.components = components or self.default_components
        channels, height, width = self.event_shape
        # per pixel: M mixture logits, then M * C locs, then M * C log-scales
        self.params_shape = (self.components * (1 + 2 * channels), height, width)

    def forward(self, params: Tensor) -> Distribution:
        m, c = self.components, self.event_shape[0]
        logits = params[..., :m, :, :]  # (..., M, H, W)
        loc = params[..., m:m + m * c, :, :].unflatten(-3, (m, c))  # (..., M, C, H, W)
        raw_scale = params[..., m + m * c:, :, :].unflatten(-3, (m, c))  # (..., M, C, H, W)
        return DiscretizedLogisticMixture(logits, loc + 0.5, _logistic_scale(raw_scale),
                                          self.levels, validate_args=False)

    def check_support(self, x: Tensor) -> str | None:
        return _check_levels(x, self.levels, "logistic-mixture")


class CategoricalLikelihood(nn.Module):
    """A 256-way softmax per value: the most flexible mass for 8-bit pixels, and the largest
    decoder output (256 numbers a pixel), so meant for small grey images."""

    description = "categorical over 256 levels"
    discrete = True

    def __init__(self, event_shape: tuple[int, ...], levels: int = LEVELS):
        super().__init__()
        self.event_shape, self.levels = tuple(event_shape), levels
        self.params_shape = (levels, *self.event_shape)

    def forward(self, params: Tensor) -> Distribution:
        logits = params.movedim(-len(self.event_shape) - 1, -1)  # (..., *event, L)
        return Independent(LevelCategorical(logits, validate_args=False), len(self.event_shape))

    def check_support(self, x: Tensor) -> str | None:
        return _check_levels(x, self.levels, "categorical")


def build_likelihood(name: str, event_shape: tuple[int, ...],
                     gaussian_scale: float | None = None,
                     components: int | None = None) -> nn.Module:
    """The likelihood module `name`; `components` sets M of logistic-mixture (None: 10)."""
    if name == "bernoulli":
        return BernoulliLikelihood(event_shape)
    if name == "continuous-bernoulli":
        return ContinuousBernoulliLikelihood(event_shape)
    if name == "gaussian":
        return GaussianLikelihood(event_shape, gaussian_scale)
    if name == "discretized-logistic":
        return DiscretizedLogisticLikelihood(event_shape)
    if name == "logistic-mixture":
        return LogisticMixtureLikelihood(event_shape, components)
    if name == "categorical":
        return CategoricalLikelihood(event_shape)
    raise ValueError(f"unknown likelihood {name!r}: choose one of {', '.join(LIKELIHOODS)}")
