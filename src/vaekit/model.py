"""The VAE: a prior p(z), an encoder giving q(z|x) and a decoder giving p(x|z).

    prior           p(z)       model.prior                (a torch Distribution)
    inference       q(z|x)     model.encode(x)            (a torch Distribution)
    generation      p(x|z)     model.decode(z)            (a torch Distribution)
    new data        x ~ p(x)   model.sample(n)            (z from the prior, then x from p(x|z))

A conditional VAE (Sohn et al. 2015) is the same model with a class label y given to both nets:
encode(x, y) -> q(z|x, y), decode(z, y) -> p(x|z, y), sample(n, y); the prior stays p(z), so
its ELBO bounds log p(x | y). Unconditional models take y=None, as before.

No loss is computed here: the ELBO lives in `objectives.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

from .distributions import (
    build_likelihood,
    build_posterior,
    build_prior,
    draw_at_temperature,
    posterior_mean_code,
)
from .nets import build_decoder, build_encoder


@dataclass
class ModelConfig:
    """Everything that fixes the model's structure; with the weights it rebuilds the model."""

    data_shape: tuple  # shape of one example, e.g. (1, 28, 28) or (64,)
    latent_dim: int = 20  # Kingma & Welling's MNIST setting
    net: str = "mlp"  # mlp works on any data; conv needs (C, H, W) images
    hidden: list = field(default_factory=lambda: [400])  # one layer of 400, as in the VAE paper
    conv_channels: list | None = None  # None: 32, doubling, until the map is <= 8 x 8
    activation: str = "relu"
    prior: str = "normal"  # normal | uniform | mixture | vamp
    prior_components: int | None = None  # K of mixture / vamp; None: 10 / 500 (the papers')
    likelihood: str = "bernoulli"  # bernoulli | continuous-bernoulli | gaussian |
    #                                discretized-logistic | logistic-mixture | categorical
    gaussian_scale: float | None = None  # None: learned per data dimension
    likelihood_components: int | None = None  # M of logistic-mixture; None: 10 (PixelCNN++)
    num_classes: int | None = None  # a conditional VAE on this many class labels; None: not

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["data_shape"] = list(self.data_shape)
        return values


def _full_precision(params: Tensor) -> Tensor:
    """Network outputs in float32 when autocast made them bfloat16/float16: the distributions'
    log-densities, KLs and sums over hundreds of dimensions need float32's mantissa. A no-op on
    float32 and float64 outputs."""
    return params.float() if params.dtype in (torch.bfloat16, torch.float16) else params


class VAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module,
                 posterior: nn.Module, likelihood: nn.Module, num_classes: int | None = None):
        super().__init__()
        self.encoder = encoder  # x [, y] -> parameters of q(z|x)
        self.decoder = decoder  # z [, y] -> parameters of p(x|z)
        self.prior_module = prior  # () -> p(z); may hold learnable parameters
        self.posterior = posterior  # encoder parameters -> q(z|x)
        self.likelihood = likelihood  # decoder parameters -> p(x|z)
        self.num_classes = num_classes  # None: unconditional
        if hasattr(prior, "attach"):  # the VampPrior mixes q(z|u_k): it borrows the encoder
            prior.attach(self.encode)

    @property
    def prior(self) -> Distribution:
        return self.prior_module()

    @property
    def latent_dim(self) -> int:
        return self.prior_module.latent_dim

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.likelihood.event_shape

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def condition(self, y: Tensor | None) -> Tensor | None:
        """Class labels y (B,) int64 -> the one-hot condition (B, num_classes) the nets take."""
        if not self.conditional:
            if y is not None:
                raise ValueError("this model is not conditional: call it without y")
            return None
        if y is None:
            raise ValueError(f"this model is conditional: pass class labels y (0..."
                             f"{self.num_classes - 1})")
        if y.dtype.is_floating_point or bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"class labels must be integers 0..{self.num_classes - 1}")
        dtype = next(self.parameters()).dtype
        return F.one_hot(y, self.num_classes).to(dtype)  # (B, num_classes)

    def encode(self, x: Tensor, y: Tensor | None = None) -> Distribution:
        """q(z|x[, y]) for a batch x (B, *data_shape); batch shape (B,), event shape (D,)."""
        return self.posterior(_full_precision(self.encoder(x, self.condition(y))))

    def decode(self, z: Tensor, y: Tensor | None = None) -> Distribution:
        """p(x|z[, y]) for codes z (..., B, D) and labels y (B,); event shape data_shape."""
        return self.likelihood(_full_precision(self.decoder(z, self.condition(y))))

    def sample(self, n: int, y: Tensor | int | None = None, *, mean: bool = False,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n new examples: z ~ p(z), then x ~ p(x|z[, y]) (or E[x|z] with mean=True).

        y: one label for all n, or labels (n,), for a conditional model. temperature scales the
        prior's noise (distributions.draw_at_temperature); generator (CPU) makes z depend on it
        alone. (n, *data_shape)
        """
        if temperature == 1.0 and generator is None:
            z = self.prior.sample((n,))  # (n, D)
        else:
            z = draw_at_temperature(self.prior, n, temperature, generator)  # (n, D)
        if isinstance(y, int):
            y = torch.full((n,), y, dtype=torch.long, device=z.device)
        px = self.decode(z, y)
        return px.mean if mean else px.sample()

    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """E[x | z] at the posterior's central code: what the model keeps of x. (B, *data_shape)"""
        return self.decode(posterior_mean_code(self.encode(x, y)), y).mean


def build_vae(config: ModelConfig) -> VAE:
    data_shape = tuple(config.data_shape)
    if config.prior == "vamp" and config.num_classes is not None:
        raise ValueError("the vamp prior mixes q(z|u) over pseudo-inputs without labels, so it "
                         "cannot be combined with a conditional model; choose prior normal or "
                         "mixture")
    condition = config.num_classes or 0
    prior = build_prior(config.prior, config.latent_dim, config.prior_components, data_shape)
    posterior = build_posterior(config.prior, config.latent_dim)
    likelihood = build_likelihood(config.likelihood, data_shape, config.gaussian_scale,
                                  config.likelihood_components)
    encoder = build_encoder(config.net, data_shape, config.hidden, posterior.params_per_example,
                            config.activation, config.conv_channels, condition)
    decoder = build_decoder(config.net, config.latent_dim, config.hidden, likelihood.params_shape,
                            data_shape, config.activation, config.conv_channels, condition)
    return VAE(encoder, decoder, prior, posterior, likelihood, config.num_classes)

