"""The VAE: a prior p(z), an encoder giving q(z|x) and a decoder giving p(x|z).

    prior           p(z)       model.prior                (a torch Distribution)
    inference       q(z|x)     model.encode(x)            (a torch Distribution)
    generation      p(x|z)     model.decode(z)            (a torch Distribution)
    new data        x ~ p(x)   model.sample(n)            (z from the prior, then x from p(x|z))

A conditional VAE (Sohn et al. 2015) is the same model with a class label y given to both nets:
encode(x, y) -> q(z|x, y), decode(z, y) -> p(x|z, y), sample(n, y); the prior stays p(z), so
its ELBO bounds log p(x | y). Unconditional models take y=None, as before.

Consumers that must work for any latent structure (objectives, estimators, training) reach z
through the interface of latent.py: `infer(x, y).draw(eps)`, `decode(code, y)`, `prior_draws()`;
for this model it has one group, z, and the code the decoder reads is z itself.

No loss is computed here: the ELBO lives in `objectives.py`.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, MixtureSameFamily

from .config import TrainConfig
from .distributions import (
    build_likelihood,
    build_prior,
    draw_at_temperature,
    draw_from_noise,
    exact_kl_per_dimension,
    posterior_mean_code,
    reparameterize,
)
from .latent import Inference, LatentDraw, LatentGroup
from .posteriors import build_posterior
from .nets import build_decoder, build_encoder


def _as_configured(name: str):
    """A model field whose meaning, choices and default are TrainConfig's (config.py), where
    each option is documented once: the same default here, not a second copy of it."""
    option = TRAIN_OPTIONS[name]
    if option.default_factory is not dataclasses.MISSING:
        return field(default_factory=option.default_factory)
    return field(default=option.default)


TRAIN_OPTIONS = {option.name: option for option in dataclasses.fields(TrainConfig)}


@dataclass
class ModelConfig:
    """Everything that fixes the model's structure; with the weights it rebuilds the model.

    Every field but data_shape and num_classes is the training option of the same name (see
    TrainConfig for its meaning and default); model_fields() lists them, and
    runs.model_config_for copies them by that list.
    """

    data_shape: tuple  # shape of one example, e.g. (1, 28, 28) or (64,)
    latent_dim: int = _as_configured("latent_dim")
    net: str = _as_configured("net")
    hidden: list = _as_configured("hidden")
    conv_channels: list | None = _as_configured("conv_channels")
    activation: str = _as_configured("activation")
    prior: str = _as_configured("prior")
    posterior: str = _as_configured("posterior")
    flow_steps: int | None = _as_configured("flow_steps")
    latent_groups: list | None = _as_configured("latent_groups")
    prior_components: int | None = _as_configured("prior_components")
    # TrainConfig's "auto" is settled from the data (data.resolve_likelihood) before a model is
    # built; a model built directly scores binary data unless told otherwise.
    likelihood: str = "bernoulli"
    gaussian_scale: float | None = _as_configured("gaussian_scale")
    likelihood_components: int | None = _as_configured("likelihood_components")
    num_classes: int | None = None  # a conditional VAE on this many class labels; None: not

    @classmethod
    def model_fields(cls) -> tuple[str, ...]:
        """The fields that are training options of the same name."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.name not in ("data_shape", "num_classes"))

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["data_shape"] = list(self.data_shape)
        return values


def _full_precision(params: Tensor) -> Tensor:
    """Network outputs in float32 when autocast made them bfloat16/float16: the distributions'
    log-densities, KLs and sums over hundreds of dimensions need float32's mantissa. A no-op on
    float32 and float64 outputs."""
    return params.float() if params.dtype in (torch.bfloat16, torch.float16) else params


class LatentModel(nn.Module, metaclass=abc.ABCMeta):
    """What every model of vaekit shares, whatever its latents: class labels as the nets take
    them, the decoder p(x | code), and new data from codes of the prior.

    A subclass gives `decoder` (code [, condition] -> the likelihood's parameters),
    `likelihood`, `num_classes`, `sample_codes` and the rest of latent.py's interface.
    """

    num_classes: int | None

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

    def decode(self, code: Tensor, y: Tensor | None = None) -> Distribution:
        """p(x | code [, y]) for codes (..., B, code_dim) and labels y (B,); event data_shape."""
        return self.likelihood(_full_precision(self.decoder(code, self.condition(y))))

    @abc.abstractmethod
    def sample_codes(self, n: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None,
                     y: Tensor | None = None) -> Tensor:
        """n codes the decoder reads, drawn from the prior with its noise scaled by
        `temperature`; generator (CPU) makes them depend on it alone. (n, code_dim)"""

    @abc.abstractmethod
    def point_code(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The code of x at its posterior's central point: what pictures of x decode.
        (B, code_dim)"""

    def reconstruct(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """E[x | code] at x's point code: what the model keeps of x. (B, *data_shape)"""
        return self.decode(self.point_code(x, y), y).mean

    def sample(self, n: int, y: Tensor | int | None = None, *, mean: bool = False,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n new examples: a code from the prior, then x ~ p(x | code [, y]) (or E[x | code]
        with mean=True).

        y: one label for all n, or labels (n,), for a conditional model. temperature scales the
        prior's noise (every group's, for a hierarchy); generator (CPU) makes the codes depend
        on it alone. (n, *data_shape)
        """
        device = next(self.parameters()).device
        if isinstance(y, int):
            y = torch.full((n,), y, dtype=torch.long, device=device)
        code = self.sample_codes(n, temperature, generator, y)  # (n, code_dim)
        px = self.decode(code, y)
        return px.mean if mean else px.sample()

    # --- sharing, as the Hugging Face Hub's ModelHubMixin does (hub.py) ----------------------
    # model_config: the ModelConfig build_vae built this model from (None for a model put
    # together by hand, which cannot be saved: nothing would say how to rebuild it).
    model_config: "ModelConfig | None" = None

    def save_pretrained(self, save_directory, *, label_names: list[str] | None = None):
        """Write config.json, model.safetensors, a model card README.md and samples.png into
        save_directory (created if missing); `from_pretrained` reads it back. Returns the
        folder."""
        from .hub import save_pretrained

        return save_pretrained(self, save_directory, label_names=label_names)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, revision: str | None = None,
                        cache_dir=None, token: str | bool | None = None,
                        local_files_only: bool = False, device="cpu"):
        """The model of a folder `save_pretrained` or `vaekit train` wrote, or of a Hugging
        Face Hub repository id (downloaded with huggingface_hub.snapshot_download: pip install
        'vaekit[hub]'). Weights are safetensors; nothing is unpickled. In eval mode."""
        from .hub import from_pretrained

        return from_pretrained(pretrained_model_name_or_path, expected=cls, revision=revision,
                               cache_dir=cache_dir, token=token,
                               local_files_only=local_files_only, device=device)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    label_names: list[str] | None = None) -> str:
        """save_pretrained into a temporary folder and upload it to the Hub; returns the URL."""
        from .hub import push_model

        return push_model(self, repo_id, private=private, token=token, label_names=label_names)


class VAE(LatentModel):
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

    # --- the latent interface (latent.py) ----------------------------------------------------
    @property
    def latent_groups(self) -> tuple[tuple[str, int], ...]:
        return (("z", self.latent_dim),)  # one group

    @property
    def code_dim(self) -> int:
        return self.latent_dim  # the decoder reads z

    def infer(self, x: Tensor, y: Tensor | None = None) -> "SingleLatentInference":
        """q(z|x[, y]) of a batch, ready to be drawn from noise (latent.Inference)."""
        return SingleLatentInference(self, self.encode(x, y))

    def prior_draws(self) -> "SingleLatentPrior":
        """p(z), ready to be drawn from noise (the naive estimator's proposal)."""
        return SingleLatentPrior(self.prior)

    def prior_variance(self) -> Tensor:
        """Var_p(z_d) of every latent dimension. (D,)"""
        return self.prior.variance

    def encode(self, x: Tensor, y: Tensor | None = None) -> Distribution:
        """q(z|x[, y]) for a batch x (B, *data_shape); batch shape (B,), event shape (D,)."""
        return self.posterior(_full_precision(self.encoder(x, self.condition(y))))

    def sample_codes(self, n: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None,
                     y: Tensor | None = None) -> Tensor:
        """z ~ p(z) (the prior does not depend on y), its noise scaled by temperature
        (distributions.draw_at_temperature). (n, D)"""
        if temperature == 1.0 and generator is None:
            return self.prior.sample((n,))  # (n, D)
        return draw_at_temperature(self.prior, n, temperature, generator)  # (n, D)

    def point_code(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The posterior family's central code of x (the mean of a Gaussian). (B, D)"""
        return posterior_mean_code(self.encode(x, y))


class SingleLatentInference(Inference):
    """The inference of a single-latent VAE: q(z|x) computed once, drawn from noise by the
    reparameterisation z = loc + scale * eps (then the posterior's transform); p(z) made when
    first needed and kept for every later draw."""

    def __init__(self, model: VAE, q: Distribution):
        self.model, self.q = model, q
        self._prior: Distribution | None = None

    def prior(self) -> Distribution:
        if self._prior is None:
            self._prior = self.model.prior
        return self._prior

    def draw(self, eps: Tensor) -> LatentDraw:
        z = reparameterize(self.q, eps)  # (..., B, D)
        return LatentDraw([LatentGroup("z", z, eps, self.q, self.prior)], code=z)

    def exact_kl_per_dimension(self) -> Tensor | None:
        return exact_kl_per_dimension(self.q, self.prior())  # (B, D) or None

    def mean_code(self) -> Tensor | None:
        try:
            return self.q.mean  # (B, D)
        except NotImplementedError:  # a transformed Gaussian: no closed form
            return None


class SingleLatentPrior:
    """Codes z ~ p(z) made of noise (distributions.draw_from_noise); a mixture prior picks each
    draw's component with a second normal per draw, `choice`."""

    def __init__(self, prior: Distribution):
        self.prior = prior
        self.needs_choice = isinstance(prior, MixtureSameFamily)

    def code(self, eps: Tensor, choice: Tensor | None = None) -> Tensor:
        return draw_from_noise(self.prior, eps, choice)  # (..., B, D)


def build_vae(config: ModelConfig) -> LatentModel:
    """The model a ModelConfig describes: the VAE, or with latent_groups the hierarchical VAE of
    hierarchy.py."""
    model = _build(config)
    model.model_config = config  # what save_pretrained writes to rebuild it
    return model


def _build(config: ModelConfig) -> LatentModel:
    if config.latent_groups:
        from .hierarchy import build_hierarchical_vae

        return build_hierarchical_vae(config)
    data_shape = tuple(config.data_shape)
    if config.prior == "vamp" and config.num_classes is not None:
        raise ValueError("the vamp prior mixes q(z|u) over pseudo-inputs without labels, so it "
                         "cannot be combined with a conditional model; choose prior normal or "
                         "mixture")
    condition = config.num_classes or 0
    prior = build_prior(config.prior, config.latent_dim, config.prior_components, data_shape)
    posterior = build_posterior(config.posterior, config.latent_dim, config.prior,
                                config.flow_steps)
    likelihood = build_likelihood(config.likelihood, data_shape, config.gaussian_scale,
                                  config.likelihood_components)
    encoder = build_encoder(config.net, data_shape, config.hidden, posterior.params_per_example,
                            config.activation, config.conv_channels, condition)
    decoder = build_decoder(config.net, config.latent_dim, config.hidden, likelihood.params_shape,
                            data_shape, config.activation, config.conv_channels, condition)
    return VAE(encoder, decoder, prior, posterior, likelihood, config.num_classes)

