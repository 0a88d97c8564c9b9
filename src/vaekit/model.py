"""The VAE: a prior p(z), an encoder giving q(z|x) and a decoder giving p(x|z).

    prior           p(z)       model.prior                (a torch Distribution)
    inference       q(z|x)     model.encode(x)            (a torch Distribution)
    generation      p(x|z)     model.decode(z)            (a torch Distribution)
    new data        x ~ p(x)   model.sample(n)            (z from the prior, then x from p(x|z))

No loss is computed here: the ELBO lives in `objectives.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.distributions import Distribution

from .distributions import build_likelihood, build_posterior, build_prior, posterior_mean_code
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
    prior: str = "normal"  # normal | uniform
    likelihood: str = "bernoulli"  # bernoulli | continuous-bernoulli | gaussian
    gaussian_scale: float | None = None  # None: learned per data dimension

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["data_shape"] = list(self.data_shape)
        return values


class VAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module,
                 posterior: nn.Module, likelihood: nn.Module):
        super().__init__()
        self.encoder = encoder  # x -> parameters of q(z|x)
        self.decoder = decoder  # z -> parameters of p(x|z)
        self.prior_module = prior  # () -> p(z); may hold learnable parameters
        self.posterior = posterior  # encoder parameters -> q(z|x)
        self.likelihood = likelihood  # decoder parameters -> p(x|z)

    @property
    def prior(self) -> Distribution:
        return self.prior_module()

    @property
    def latent_dim(self) -> int:
        return self.prior_module.latent_dim

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.likelihood.event_shape

    def encode(self, x: Tensor) -> Distribution:
        """q(z|x) for a batch x (B, *data_shape); batch shape (B,), event shape (D,)."""
        return self.posterior(self.encoder(x))

    def decode(self, z: Tensor) -> Distribution:
        """p(x|z) for codes z (..., D); event shape data_shape."""
        return self.likelihood(self.decoder(z))

    def sample(self, n: int, *, mean: bool = False) -> Tensor:
        """n new examples: z ~ p(z), then x ~ p(x|z) (or E[x|z] with mean=True). (n, *data_shape)"""
        z = self.prior.sample((n,))  # (n, D)
        px = self.decode(z)
        return px.mean if mean else px.sample()

    def reconstruct(self, x: Tensor) -> Tensor:
        """E[x | z] at the posterior's central code: what the model keeps of x. (B, *data_shape)"""
        return self.decode(posterior_mean_code(self.encode(x))).mean


def build_vae(config: ModelConfig) -> VAE:
    data_shape = tuple(config.data_shape)
    prior = build_prior(config.prior, config.latent_dim)
    posterior = build_posterior(config.prior, config.latent_dim)
    likelihood = build_likelihood(config.likelihood, data_shape, config.gaussian_scale)
    encoder = build_encoder(config.net, data_shape, config.hidden, posterior.params_per_example,
                            config.activation, config.conv_channels)
    decoder = build_decoder(config.net, config.latent_dim, config.hidden, likelihood.params_shape,
                            data_shape, config.activation, config.conv_channels)
    return VAE(encoder, decoder, prior, posterior, likelihood)

