"""The linear-Gaussian VAE: a VAE whose log p(x), posterior and ELBO are known exactly.

    z ~ N(0, I_D),   x | z ~ N(W z + b, diag(sigma^2))          (probabilistic PCA, Tipping &
    p(x)      = N(x; b, W W^T + diag(sigma^2))                   Bishop 1999; factor analysis
    p(z | x)  = N(M^-1 W^T S^-1 (x - b), M^-1),                  when sigma varies by dimension)
                M = I + W^T S^-1 W,  S = diag(sigma^2)

It is built through the public API, ModelConfig(net="mlp", hidden=[], likelihood="gaussian",
gaussian_scale=sigma): both networks are then single linear maps, the encoder giving the
posterior's mean and (through softplus) its scale. That makes it the test oracle for every
estimator and bound: importance sampling must converge to `exact_log_px`, the ELBO of the
model's encoder must equal `exact_elbo`, and with `set_exact_posterior` the ELBO is log p(x).
All exact quantities are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Independent, MultivariateNormal, Normal

from .distributions import GaussianLikelihood, GaussianPosterior, StandardNormalPrior
from .model import VAE, ModelConfig, build_vae
from .objectives import ELBOTerms
from .randomness import derive_seed, seeded_generator


def linear_gaussian_config(data_shape: tuple[int, ...], latent_dim: int,
                           sigma: float | None) -> ModelConfig:
    """The ModelConfig of a linear-Gaussian VAE (sigma None: learned per data dimension)."""
    return ModelConfig(data_shape=tuple(data_shape), latent_dim=latent_dim, net="mlp", hidden=[],
                       likelihood="gaussian", gaussian_scale=sigma)


@dataclass
class LinearGaussian:
    """The generative model's numbers, float64, data flattened to D_x dimensions."""

    weight: Tensor  # (D_x, D) W
    bias: Tensor  # (D_x,) b
    variance: Tensor  # (D_x,) sigma^2

    def marginal(self) -> MultivariateNormal:
        """p(x) = N(b, W W^T + diag(sigma^2))."""
        covariance = self.weight @ self.weight.T + torch.diag(self.variance)  # (D_x, D_x)
        return MultivariateNormal(self.bias, covariance_matrix=covariance)

    def posterior_precision(self) -> Tensor:
        """M = I + W^T S^-1 W. (D, D)"""
        scaled = self.weight / self.variance[:, None]  # (D_x, D) S^-1 W
        return torch.eye(self.weight.shape[1], dtype=torch.float64) + self.weight.T @ scaled

    def posterior(self, x: Tensor) -> MultivariateNormal:
        """The exact p(z | x) for x (B, D_x)."""
        precision = self.posterior_precision()
        covariance = torch.linalg.inv(precision)
        projection = covariance @ (self.weight / self.variance[:, None]).T  # (D, D_x)
        loc = (x - self.bias) @ projection.T  # (B, D)
        return MultivariateNormal(loc, covariance_matrix=covariance)


def _linear_layer(net: nn.Module, what: str) -> nn.Linear:
    layers = list(net.net) if hasattr(net, "net") else []
    if len(layers) != 1 or not isinstance(layers[0], nn.Linear):
        raise ValueError(f"not a linear-Gaussian VAE: the {what} is not a single linear map "
                         "(build it with net='mlp', hidden=[])")
    return layers[0]


def linear_parts(model: VAE) -> LinearGaussian:
    """W, b and sigma^2 of a linear-Gaussian VAE; ValueError for any other model."""
    if not isinstance(model.prior_module, StandardNormalPrior):
        raise ValueError("not a linear-Gaussian VAE: the prior must be the standard normal")
    if not isinstance(model.likelihood, GaussianLikelihood):
        raise ValueError("not a linear-Gaussian VAE: the likelihood must be Gaussian")
    if type(model.posterior) is not GaussianPosterior:
        raise ValueError("not a linear-Gaussian VAE: the posterior must be a diagonal Gaussian")
    _linear_layer(model.encoder, "encoder")
    decoder = _linear_layer(model.decoder, "decoder")
    variance = (2 * model.likelihood.log_scale.detach().double()).exp().reshape(-1)
    return LinearGaussian(decoder.weight.detach().double(), decoder.bias.detach().double(),
                          variance)


def exact_log_px(model: VAE, x: Tensor) -> Tensor:
    """log p(x) of a linear-Gaussian VAE for x (B, *data_shape), in nats. (B,) float64"""
    parts = linear_parts(model)
    flat = x.detach().double().reshape(len(x), -1).to(parts.bias.device)
    return parts.marginal().log_prob(flat)


def exact_posterior(model: VAE, x: Tensor) -> MultivariateNormal:
    """The true posterior p(z | x) of a linear-Gaussian VAE (float64, full covariance)."""
    parts = linear_parts(model)
    return parts.posterior(x.detach().double().reshape(len(x), -1))


def exact_elbo(model: VAE, x: Tensor) -> ELBOTerms:
    """The ELBO of the model's own encoder in closed form, both terms, float64 (B,) each.

    E_q[log p(x|z)] = log N(x; W mu + b, S) - tr(W diag(s^2) W^T S^-1) / 2 for q = N(mu, s^2).
    Differentiable in the encoder's parameters: the exact gradient the ELBO estimators target.
    """
    parts = linear_parts(model)
    flat = x.detach().double().reshape(len(x), -1)
    q = model.encode(x)
    loc, scale = q.base_dist.loc.double(), q.base_dist.scale.double()  # (B, D) each
    mean_x = loc @ parts.weight.T + parts.bias  # (B, D_x)
    gaussian = Independent(Normal(mean_x, parts.variance.sqrt()), 1)
    spread = (scale.square() @ (parts.weight.square() / parts.variance[:, None]).T).sum(-1)
    reconstruction = gaussian.log_prob(flat) - spread / 2  # (B,)
    kl = 0.5 * (loc.square() + scale.square() - 1 - 2 * scale.log()).sum(-1)  # (B,)
    return ELBOTerms(reconstruction, kl)


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


def set_exact_posterior(model: VAE) -> VAE:
    """Make q(z|x) the true posterior p(z|x); the model's p(x) is unchanged.

    The posterior covariance M^-1 is diagonal when W^T S^-1 W is; if it is not, the latent space
    is first rotated (W <- W V with V the eigenvectors of W^T S^-1 W). A rotation leaves the
    standard normal prior, and so p(x), exactly as they were. Then the encoder's linear map is
    set to give the posterior mean and its (constant) scale.
    """
    parts = linear_parts(model)
    decoder = _linear_layer(model.decoder, "decoder")
    encoder = _linear_layer(model.encoder, "encoder")
    gram = parts.weight.T @ (parts.weight / parts.variance[:, None])  # (D, D)
    off_diagonal = gram - torch.diag(torch.diagonal(gram))
    # float32 weights leave off-diagonal rounding of ~1e-7 relative: that is diagonal already
    if float(off_diagonal.abs().max()) > 1e-5 * max(1.0, float(gram.abs().max())):
        _, rotation = torch.linalg.eigh(gram)
        parts.weight = parts.weight @ rotation
        with torch.no_grad():
            decoder.weight.copy_(parts.weight.to(decoder.weight.dtype))
    precision = torch.diagonal(parts.posterior_precision())  # (D,), M is now diagonal
    projection = (parts.weight / parts.variance[:, None]).T / precision[:, None]  # (D, D_x)
    scale = precision.rsqrt()  # (D,)
    latent = model.latent_dim
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.bias.zero_()
        encoder.weight[:latent] = projection.to(encoder.weight.dtype)
        encoder.bias[:latent] = (-projection @ parts.bias).to(encoder.bias.dtype)
        encoder.bias[latent:] = _inverse_softplus(scale).to(encoder.bias.dtype)
    return model


def linear_gaussian_vae(data_dim: int, latent_dim: int, sigma: float, *, seed: int = 0,
                        column_scales: list[float] | None = None) -> VAE:
    """A seeded linear-Gaussian VAE whose W has orthogonal columns (norms column_scales,
    default 1, 2, 3, ...), a random offset b, and the exact posterior as its encoder."""
    if latent_dim > data_dim:
        raise ValueError(f"latent_dim {latent_dim} exceeds data_dim {data_dim}")
    model = build_vae(linear_gaussian_config((data_dim,), latent_dim, sigma))
    generator = seeded_generator(derive_seed(seed, "linear-gaussian"))
    basis, _ = torch.linalg.qr(torch.randn(data_dim, latent_dim, generator=generator,
                                           dtype=torch.float64))  # orthonormal columns
    scales = torch.tensor(column_scales if column_scales is not None
                          else [1.0 + d for d in range(latent_dim)], dtype=torch.float64)
    if len(scales) != latent_dim:
        raise ValueError(f"column_scales needs {latent_dim} values, got {len(scales)}")
    decoder = _linear_layer(model.decoder, "decoder")
    with torch.no_grad():
        decoder.weight.copy_((basis * scales).float())
        decoder.bias.copy_(torch.randn(data_dim, generator=generator))
    return set_exact_posterior(model)


def sample_data(model: VAE, n: int, seed: int = 0) -> Tensor:
    """n examples x ~ p(x) drawn from the model with a seeded generator. (n, *data_shape)"""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "oracle-data"))
        return model.sample(n)

