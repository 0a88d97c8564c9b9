"""Posterior families q(z | x): modules that turn encoder outputs into a torch distribution.

    gaussian          N(loc, diag(scale^2))                               (Kingma & Welling 2014)
    sigmoid-gaussian  sigmoid(N(loc, diag(scale^2))), inside the unit cube (the uniform prior)
    full-covariance   N(loc, L L^T), L lower triangular with a positive diagonal
    iaf               z_0 ~ N(loc, diag(scale^2)), then T inverse autoregressive steps
                      z_t = z_{t-1} * exp(s_t) + m_t, (m_t, s_t) = MADE_t(z_{t-1}, h)
                      with a context h from the encoder                     (Kingma et al. 2016)

The richer the family, the smaller the gap log p(x) - ELBO can be (the note's points 13-14: the
approximation class decides the gap). Each family answers for itself what its consumers need:

    draw(eps)                 a draw made of standard normal noise eps (..., B, D) the caller owns
    point_code()              the central code pictures show (B, D)
    marginal_scale()          the spread of each coordinate (B, D), for the embedding's picture
    factorises_against(p)     whether log q - log p splits into one term per dimension
    score_log_prob(eps)       log q at a fixed draw, differentiable in q's parameters only

A family is one class here and its entry in POSTERIOR_FAMILIES (and its valid priors in
names.py). The full-covariance family has a closed-form KL against a diagonal Gaussian prior
(registered below); the IAF's KL is estimated by Monte Carlo at the draw, as every pair torch
does not register.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    SigmoidTransform,
    Transform,
    TransformedDistribution,
    constraints,
    register_kl,
)

from .distributions import factorised
from .names import POSTERIORS, posterior_problem, resolve_posterior

class DiagonalGaussian(Independent):
    """N(loc, diag(scale^2)) over the last dimension: the Gaussian posterior family.

    A posterior family answers for itself what its consumers need: a draw made of standard
    normal noise (`draw`), the point code pictures show (`point_code`), whether log q - log p
    splits over dimensions against a given prior (`factorises_against`), and log q at a fixed
    draw, differentiable in its parameters only (`score_log_prob`, the score-function term).
    """

    def __init__(self, loc: Tensor, scale: Tensor):
        super().__init__(Normal(loc, scale, validate_args=False), 1)

    def draw(self, eps: Tensor) -> Tensor:
        normal = self.base_dist
        return normal.loc + normal.scale * eps  # (..., B, D)

    def point_code(self) -> Tensor:
        return self.base_dist.loc  # (B, D) the mean

    def marginal_scale(self) -> Tensor:
        return self.base_dist.scale  # (B, D)

    def factorises_against(self, p: Distribution) -> bool:
        return factorised(p)

    def score_log_prob(self, eps: Tensor) -> Tensor:
        normal = self.base_dist  # loc, scale (B, D)
        pre_image = (normal.loc + normal.scale * eps).detach()  # (S, B, D) fixed draws
        return normal.log_prob(pre_image).sum(-1)  # (S, B)


class SquashedGaussian(TransformedDistribution):
    """sigmoid(N(loc, diag(scale^2))): a diagonal Gaussian squashed into the unit cube.

    The sigmoid caches its last input, so `q.log_prob(q.draw(eps))` is computed from the
    pre-sigmoid sample and stays exact where the sigmoid saturates (inverting a float32 sigmoid
    near 1 is not). The sigmoid has no parameters, so at a fixed pre-image g the log-Jacobian does
    not depend on q's parameters: the score-function term is the Gaussian's.
    """

    def __init__(self, gaussian: DiagonalGaussian):
        super().__init__(gaussian, [SigmoidTransform(cache_size=1)], validate_args=False)

    def draw(self, eps: Tensor) -> Tensor:
        z = self.base_dist.draw(eps)  # (..., B, D)
        for transform in self.transforms:
            z = transform(z)  # caches the pre-image, so q.log_prob(z) stays exact
        return z

    def point_code(self) -> Tensor:
        code = self.base_dist.point_code()
        for transform in self.transforms:
            code = transform(code)
        return code  # (B, D) the squashed mean

    def marginal_scale(self) -> Tensor:
        return self.base_dist.marginal_scale()  # (B, D) the scale before the squashing

    def factorises_against(self, p: Distribution) -> bool:
        return factorised(p)

    def score_log_prob(self, eps: Tensor) -> Tensor:
        return self.base_dist.score_log_prob(eps)  # (S, B)


class GaussianPosterior(nn.Module):
    """q(z|x) = N(loc, diag(scale^2)) from 2*D encoder outputs (scale through softplus)."""

    name = "gaussian"

    def __init__(self, latent_dim: int, flow_steps: int | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.params_per_example = 2 * latent_dim

    def forward(self, params: Tensor) -> Distribution:
        loc, raw_scale = params.chunk(2, dim=-1)  # (B, D) each
        return DiagonalGaussian(loc, F.softplus(raw_scale))


class SigmoidGaussianPosterior(GaussianPosterior):
    """q(z|x) = sigmoid(N(loc, diag(scale^2))) (SquashedGaussian): a Gaussian squashed into the
    unit cube, for the uniform prior, whose support the posterior must not leave."""

    name = "sigmoid-gaussian"

    def forward(self, params: Tensor) -> Distribution:
        return SquashedGaussian(super().forward(params))




class FullCovarianceGaussian(MultivariateNormal):
    """N(loc, L L^T) with L (B, D, D) lower triangular: every correlation of the coordinates."""

    def __init__(self, loc: Tensor, scale_tril: Tensor):
        super().__init__(loc, scale_tril=scale_tril, validate_args=False)

    def draw(self, eps: Tensor) -> Tensor:
        # (B, D, D) @ (..., B, D, 1): every sample of an example through that example's L
        return self.loc + (self._unbroadcasted_scale_tril @ eps.unsqueeze(-1)).squeeze(-1)

    def point_code(self) -> Tensor:
        return self.loc  # (B, D) the mean

    def marginal_scale(self) -> Tensor:
        return self._unbroadcasted_scale_tril.square().sum(-1).sqrt()  # (B, D) sqrt diag(L L^T)

    def coordinate_marginals(self, eps: Tensor | None = None) -> Normal:
        """q(z_d | x) of each coordinate alone: N(loc_d, (L L^T)_dd), exactly. batch (B, D)"""
        return Normal(self.loc, self.marginal_scale(), validate_args=False)

    def factorises_against(self, p: Distribution) -> bool:
        return False

    def score_log_prob(self, eps: Tensor) -> Tensor:
        return self.log_prob(self.draw(eps).detach())  # (S, B)


@register_kl(FullCovarianceGaussian, Independent)
def _kl_full_covariance_diagonal(q: FullCovarianceGaussian, p: Independent) -> Tensor:
    """KL(N(m, L L^T) || N(mu, diag(s^2))) in closed form, against a diagonal Gaussian prior:
    (1/2) [sum_d ((L L^T)_dd + (m_d - mu_d)^2) / s_d^2 - D + 2 sum_d log s_d - log det L L^T].
    Other priors (a mixture) have none: NotImplementedError, and the KL is estimated."""
    if not (isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    prior_loc, prior_scale = p.base_dist.loc, p.base_dist.scale  # (D,) or (B, D)
    tril = q._unbroadcasted_scale_tril  # (B, D, D)
    variance = tril.square().sum(-1)  # (B, D) the diagonal of L L^T
    log_det = 2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (B,)
    ratio = (variance + (q.loc - prior_loc).square()) / prior_scale.square()  # (B, D)
    return 0.5 * (ratio.sum(-1) - q.loc.shape[-1] + 2 * prior_scale.log().sum(-1) - log_det)


class FullCovariancePosterior(nn.Module):
    """q(z|x) = N(loc, L L^T) from D + D + D(D-1)/2 encoder outputs: the mean, the diagonal of L
    (through softplus) and its strictly lower triangle. Zero off-diagonal outputs give the
    diagonal Gaussian exactly."""

    name = "full-covariance"

    def __init__(self, latent_dim: int, flow_steps: int | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.params_per_example = 2 * latent_dim + latent_dim * (latent_dim - 1) // 2

    def forward(self, params: Tensor) -> Distribution:
        dim = self.latent_dim
        loc, raw_scale, lower = params.split([dim, dim, params.shape[-1] - 2 * dim], dim=-1)
        rows, cols = torch.tril_indices(dim, dim, offset=-1, device=params.device)  # (2, P)
        tril = torch.diag_embed(F.softplus(raw_scale))  # (B, D, D)
        tril[..., rows, cols] = lower  # the strictly lower part, (B, P) into place
        return FullCovarianceGaussian(loc, tril)


# --- inverse autoregressive flow ----------------------------------------------------------------

# Each step's log-scale is bounded to +-LOG_SCALE_BOUND (a smooth tanh clamp, zero at zero) so a
# step can stretch a coordinate at most e^3 times: the flow cannot blow up a draw in one update.
LOG_SCALE_BOUND = 3.0


class MaskedLinear(nn.Linear):
    """A linear map whose weight is multiplied by a fixed 0/1 mask (out, in)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """An autoregressive network with a context (Germain et al. 2015; Kingma et al. 2016):
    (z (..., B, D), h (B, H)) -> (shift, log_scale) (..., B, D) each, where output d depends on
    the coordinates before d in `order` only, and on h. Two masked hidden layers of `width` ELU
    units; the output layer starts at zero, so an untrained step is the identity."""

    def __init__(self, dim: int, width: int, order: Tensor):
        super().__init__()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(1, dim + 1)  # rank[d]: coordinate d is the rank[d]-th in order
        hidden_rank = torch.arange(width) % max(dim - 1, 1) + 1  # (W,) ranks 1 .. D-1 in turn
        to_hidden = hidden_rank[:, None] >= rank[None, :]  # (W, D) unit sees coordinates <= rank
        hidden_to_hidden = hidden_rank[:, None] >= hidden_rank[None, :]  # (W, W)
        to_output = rank[:, None] > hidden_rank[None, :]  # (D, W) output d sees ranks < rank[d]
        self.first = MaskedLinear(dim, width, to_hidden)
        self.context = nn.Linear(width, width, bias=False)  # h enters every first-layer unit
        self.second = MaskedLinear(width, width, hidden_to_hidden)
        self.out = MaskedLinear(width, 2 * dim, torch.cat([to_output, to_output]))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        hidden = F.elu(self.first(z) + self.context(context))  # (..., B, W)
        hidden = F.elu(self.second(hidden))  # (..., B, W)
        shift, raw = self.out(hidden).chunk(2, dim=-1)  # (..., B, D) each
        log_scale = LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND)  # bounded, 0 at 0
        return shift, log_scale


class InverseAutoregressiveStep(Transform):
    """y = x * exp(s(x)) + m(x), (m, s) = MADE(x, h): one IAF step, a bijection of R^D whose
    Jacobian is triangular (in the MADE's order), so log |det| = sum_d s_d(x).

    The forward pass is one network call for all coordinates; the inverse (needed only for a z
    that was not drawn here, such as a fixed draw of the score-function estimator) takes D calls,
    each fixing one more coordinate in order.
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, made: MADE, context: Tensor, dim: int):
        super().__init__(cache_size=1)
        self.made, self.dim = made, dim
        self.context = context  # (B, W)
        self._last: tuple[Tensor, Tensor] | None = None  # (x, s(x)) of the latest forward call

    def _call(self, x: Tensor) -> Tensor:
        shift, log_scale = self.made(x, self.context)  # (..., B, D) each
        self._last = (x, log_scale)
        return x * log_scale.exp() + shift

    def _inverse(self, y: Tensor) -> Tensor:
        x = torch.zeros_like(y)
        for _ in range(self.dim):  # after pass i the first i + 1 coordinates in order are exact
            shift, log_scale = self.made(x, self.context)
            x = (y - shift) * (-log_scale).exp()
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is x:
            log_scale = self._last[1]  # computed by the forward pass that made y
        else:
            log_scale = self.made(x, self.context)[1]
        return log_scale.sum(-1)  # (..., B)


class InverseAutoregressiveFlow(TransformedDistribution):
    """A diagonal Gaussian pushed through inverse autoregressive steps (Kingma et al. 2016).

    Each step caches its input, so `q.log_prob(q.draw(eps))` reads every step's log-scale from
    the draw itself: no inverse is computed for the draws training and estimators make.
    """

    def __init__(self, gaussian: DiagonalGaussian, steps: list[InverseAutoregressiveStep]):
        super().__init__(gaussian, steps, validate_args=False)

    def draw(self, eps: Tensor) -> Tensor:
        z = self.base_dist.draw(eps)  # (..., B, D)
        for step in self.transforms:
            z = step(z)
        return z

    def point_code(self) -> Tensor:
        code = self.base_dist.point_code()  # (B, D) the base mean, carried through the flow
        for step in self.transforms:
            code = step(code)
        return code

    def marginal_scale(self, draws: int = 64) -> Tensor:
        """The standard deviation of each coordinate over `draws` draws of fixed noise: a flow's
        marginals have no closed form. (B, D)"""
        return self.coordinate_marginals(self._fixed_noise(draws)).scale

    def coordinate_marginals(self, eps: Tensor | None = None) -> Normal:
        """Each coordinate's marginal as the Gaussian of its mean and variance over the draws
        made of eps (S, B, D) (64 of fixed noise if None). batch (B, D)"""
        z = self.draw(self._fixed_noise(64) if eps is None else eps)  # (S, B, D)
        return Normal(z.mean(0), z.std(0).clamp_min(1e-12), validate_args=False)

    def _fixed_noise(self, draws: int) -> Tensor:
        loc = self.base_dist.base_dist.loc  # (B, D)
        generator = torch.Generator(device=loc.device).manual_seed(0)
        return torch.randn(draws, *loc.shape, generator=generator, device=loc.device,
                           dtype=loc.dtype)  # (S, B, D)

    def factorises_against(self, p: Distribution) -> bool:
        return False

    def score_log_prob(self, eps: Tensor) -> Tensor:
        # a detached z is a new tensor: no step's cache matches it, so log_prob inverts the flow
        # with the current parameters, which is what the score-function term differentiates
        return self.log_prob(self.draw(eps).detach())  # (S, B)


class IAFPosterior(nn.Module):
    """q(z|x): an inverse autoregressive flow of `flow_steps` steps on a diagonal Gaussian.

    The encoder gives 2 D numbers for the Gaussian and a context h of `width` numbers that every
    step reads. Steps alternate the autoregressive order (forward, reversed), so every coordinate
    can depend on every other after two steps. Untrained, each step is the identity, so the flow
    starts as the diagonal Gaussian exactly.
    """

    name = "iaf"
    default_steps = 2

    def __init__(self, latent_dim: int, flow_steps: int | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.steps = self.default_steps if flow_steps is None else flow_steps
        self.width = max(64, 4 * latent_dim)  # hidden units of each step's MADE
        self.params_per_example = 2 * latent_dim + self.width
        forward_order = torch.arange(latent_dim)
        self.made = nn.ModuleList(
            MADE(latent_dim, self.width, forward_order if t % 2 == 0 else forward_order.flip(0))
            for t in range(self.steps))

    def forward(self, params: Tensor) -> Distribution:
        dim = self.latent_dim
        loc, raw_scale, context = params.split([dim, dim, self.width], dim=-1)  # (B, .) each
        gaussian = DiagonalGaussian(loc, F.softplus(raw_scale))
        steps = [InverseAutoregressiveStep(made, context, dim) for made in self.made]
        return InverseAutoregressiveFlow(gaussian, steps)


# A posterior family is one class and its entry here (and its valid priors in names.py).
POSTERIOR_FAMILIES = {family.name: family for family in (
    GaussianPosterior, SigmoidGaussianPosterior, FullCovariancePosterior, IAFPosterior)}
assert tuple(POSTERIOR_FAMILIES) == POSTERIORS


def build_posterior(name: str, latent_dim: int, prior: str = "normal",
                    flow_steps: int | None = None) -> nn.Module:
    """The posterior family `name` (auto: the prior's default, see names.POSTERIORS_FOR_PRIOR),
    checked against the prior it is paired with; flow_steps sets the IAF's number of steps."""
    problem = posterior_problem(name, prior) if name == "auto" or name in POSTERIORS else \
        f"unknown posterior {name!r}: choose one of auto, {', '.join(POSTERIORS)}"
    if problem:
        raise ValueError(problem)
    return POSTERIOR_FAMILIES[resolve_posterior(name, prior)](latent_dim, flow_steps)


def posterior_scale(q: Distribution) -> Tensor:
    """The spread of each latent coordinate under q (B, D): the family's own."""
    return q.marginal_scale()
