"""The linear-Gaussian VAE: a VAE whose log p(x), posterior and ELBO are known exactly.

    z ~ N(0, I_D),   x | z ~ N(W z + b, diag(sigma^2))          (probabilistic PCA, Tipping &
    p(x)      = N(x; b, W W^T + diag(sigma^2))                   Bishop 1999; factor analysis
    p(z | x)  = N(M^-1 W^T S^-1 (x - b), M^-1),                  when sigma varies by dimension)
                M = I + W^T S^-1 W,  S = diag(sigma^2)

A second oracle, `LinearGaussianHierarchy`, has two latent groups (z2 -> z1 -> x, all
linear-Gaussian) with an exact marginal and exact posteriors: the proof that objectives and
estimators work for any latent structure through latent.py.

The single-latent oracle is built through the public API, ModelConfig(net="mlp", hidden=[],
likelihood="gaussian", gaussian_scale=sigma): both networks are then single linear maps, the encoder giving the
posterior's mean and (through softplus) its scale. That makes it the test oracle for every
estimator and bound: importance sampling must converge to `exact_log_px`, the ELBO of the
model's encoder must equal `exact_elbo`, and with `set_exact_posterior` the ELBO is log p(x).
All exact quantities are computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from .distributions import GaussianLikelihood, StandardNormalPrior
from .posteriors import FullCovariancePosterior, GaussianPosterior
from .latent import Inference, LatentDraw, LatentGroup, split_noise
from .model import VAE, ModelConfig, build_vae
from .nets import build_decoder
from .objectives import ELBOTerms
from .randomness import derive_seed, seeded_generator


LINEAR_POSTERIORS = ("gaussian", "full-covariance")  # posterior families an oracle may have


def linear_gaussian_config(data_shape: tuple[int, ...], latent_dim: int,
                           sigma: float | None, posterior: str = "gaussian") -> ModelConfig:
    """The ModelConfig of a linear-Gaussian VAE (sigma None: learned per data dimension), its
    q(z|x) a diagonal Gaussian or a full-covariance one (both linear in x)."""
    return ModelConfig(data_shape=tuple(data_shape), latent_dim=latent_dim, net="mlp", hidden=[],
                       likelihood="gaussian", gaussian_scale=sigma, posterior=posterior)


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
    if type(model.posterior) not in (GaussianPosterior, FullCovariancePosterior):
        raise ValueError("not a linear-Gaussian VAE: the posterior must be a diagonal or a "
                         "full-covariance Gaussian")
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

    E_q[log p(x|z)] = log N(x; W mu + b, S) - tr(W C W^T S^-1) / 2 for q = N(mu, C), C diagonal
    or full; KL = (tr C + |mu|^2 - D - log det C) / 2. Differentiable in the encoder's
    parameters: the exact gradient the ELBO estimators target.
    """
    parts = linear_parts(model)
    flat = x.detach().double().reshape(len(x), -1)
    q = model.encode(x)
    loc = q.mean.double()  # (B, D)
    if isinstance(q, MultivariateNormal):
        covariance = q.covariance_matrix.double()  # (B, D, D)
    else:
        covariance = torch.diag_embed(q.base_dist.scale.double().square())  # (B, D, D)
    mean_x = loc @ parts.weight.T + parts.bias  # (B, D_x)
    gaussian = Independent(Normal(mean_x, parts.variance.sqrt()), 1)
    # sum_i (W C W^T)_ii / sigma_i^2
    spread = torch.einsum("id,bde,ie->b", parts.weight / parts.variance[:, None], covariance,
                          parts.weight)  # (B,)
    reconstruction = gaussian.log_prob(flat) - spread / 2  # (B,)
    trace = torch.diagonal(covariance, dim1=-2, dim2=-1).sum(-1)  # (B,)
    kl = 0.5 * (trace + loc.square().sum(-1) - loc.shape[-1] - torch.logdet(covariance))
    return ELBOTerms(reconstruction, kl)


def best_diagonal_gap(model: VAE) -> float:
    """The smallest gap log p(x) - ELBO any diagonal Gaussian q(z|x) can reach, in nats, the same
    for every x: min KL(diagonal q || p(z|x)) = (sum_d log M_dd - log det M) / 2, M = I + W^T S^-1
    W the posterior's precision (the best diagonal q has variances 1 / M_dd). Zero exactly when
    the posterior's coordinates are uncorrelated."""
    precision = linear_parts(model).posterior_precision()  # (D, D)
    return float(0.5 * (torch.diagonal(precision).log().sum() - torch.logdet(precision)))


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
    if isinstance(model.posterior, FullCovariancePosterior):
        return _set_exact_full_covariance(model, parts, encoder)
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


def fit_encoder_exactly(model: VAE, x: Tensor, iterations: int = 1200) -> VAE:
    """Fit q(z|x) alone to the best of its family by the exact ELBO (exact_elbo), the decoder and
    so p(x) kept: L-BFGS on a deterministic objective, so what is reached is the family's optimum
    (use a float64 model and data for the last digits)."""
    optimizer = torch.optim.LBFGS(model.encoder.parameters(), max_iter=iterations,
                                  history_size=50, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        optimizer.zero_grad()
        loss = -exact_elbo(model, x).elbo.mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def posterior_gaps(data_dim: int = 8, latent_dim: int = 3, sigma: float = 0.5, n: int = 512,
                   seed: int = 0) -> dict[str, float]:
    """The approximation class on an exact answer: a linear-Gaussian model with a correlated
    posterior, an encoder of each linear family fitted to its best on the same data and decoder,
    and each one's gap log p(x) - ELBO (mean over the data, nats), beside the least gap any
    diagonal Gaussian can reach ("diagonal bound")."""
    reference = linear_gaussian_vae(data_dim, latent_dim, sigma, seed=seed, orthogonal=False,
                                    posterior="full-covariance")
    x = sample_data(reference, n, seed=seed + 1).double()
    exact = exact_log_px(reference, x)
    gaps = {"diagonal bound": best_diagonal_gap(reference)}
    for posterior in LINEAR_POSTERIORS:
        model = build_vae(linear_gaussian_config((data_dim,), latent_dim, sigma,
                                                 posterior)).double()
        decoder = _linear_layer(model.decoder, "decoder")
        with torch.no_grad():
            decoder.weight.copy_(_linear_layer(reference.decoder, "decoder").weight)
            decoder.bias.copy_(_linear_layer(reference.decoder, "decoder").bias)
        fit_encoder_exactly(model, x)
        with torch.no_grad():
            gaps[posterior] = float((exact - exact_elbo(model, x).elbo).mean())
    return gaps


def _set_exact_full_covariance(model: VAE, parts: LinearGaussian, encoder: nn.Linear) -> VAE:
    """The full-covariance q(z|x) = p(z|x) exactly, no rotation: mean M^-1 W^T S^-1 (x - b) from
    the encoder's weights, L = cholesky(M^-1) (constant in x) from its biases."""
    latent = model.latent_dim
    covariance = torch.linalg.inv(parts.posterior_precision())  # (D, D)
    projection = covariance @ (parts.weight / parts.variance[:, None]).T  # (D, D_x)
    tril = torch.linalg.cholesky(covariance)  # (D, D)
    rows, cols = torch.tril_indices(latent, latent, offset=-1)
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.bias.zero_()
        encoder.weight[:latent] = projection.to(encoder.weight.dtype)
        encoder.bias[:latent] = (-projection @ parts.bias).to(encoder.bias.dtype)
        encoder.bias[latent:2 * latent] = _inverse_softplus(torch.diagonal(tril)).to(
            encoder.bias.dtype)
        encoder.bias[2 * latent:] = tril[rows, cols].to(encoder.bias.dtype)
    return model


def linear_gaussian_vae(data_dim: int, latent_dim: int, sigma: float, *, seed: int = 0,
                        column_scales: list[float] | None = None, orthogonal: bool = True,
                        posterior: str = "gaussian") -> VAE:
    """A seeded linear-Gaussian VAE whose W has orthogonal columns (norms column_scales,
    default 1, 2, 3, ...), a random offset b, and the exact posterior as its encoder.

    orthogonal=False draws W's columns as independent normals (then scaled), so the posterior's
    coordinates are correlated: the case a diagonal q(z|x) cannot match and a full-covariance
    one (posterior="full-covariance") matches exactly.
    """
    if latent_dim > data_dim:
        raise ValueError(f"latent_dim {latent_dim} exceeds data_dim {data_dim}")
    if posterior not in LINEAR_POSTERIORS:
        raise ValueError(f"a linear-Gaussian VAE's posterior is one of "
                         f"{', '.join(LINEAR_POSTERIORS)}, not {posterior!r}")
    model = build_vae(linear_gaussian_config((data_dim,), latent_dim, sigma, posterior))
    generator = seeded_generator(derive_seed(seed, "linear-gaussian"))
    basis = torch.randn(data_dim, latent_dim, generator=generator, dtype=torch.float64)
    if orthogonal:
        basis, _ = torch.linalg.qr(basis)  # orthonormal columns
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



# ------------------------------------------------------------------------------------------------
# Two groups: the linear-Gaussian hierarchy z2 -> z1 -> x


class LinearGaussianHierarchy(nn.Module):
    """A model with two latent groups whose log p(x) and posteriors are known exactly.

        z2 ~ N(0, I_D2),   z1 | z2 ~ N(A z2 + c, diag(s^2)),   x | z1 ~ N(W z1 + b, diag(sigma^2))
        p(x) = N(x; W c + b, W (A A^T + diag(s^2)) W^T + diag(sigma^2))

    Inference is top-down, q(z2 | x) q(z1 | x, z2), each a full-covariance Gaussian linear in its
    inputs: the family that holds the exact posterior, so `set_exact_posterior` makes the ELBO
    log p(x). It satisfies the latent interface of latent.py (two groups, the decoder reading
    z1), which is all the objectives and estimators use: nothing in them knows it has two groups.
    Every number is float64; the decoder and likelihood are the library's own modules.
    """

    def __init__(self, data_dim: int, top_dim: int, bottom_dim: int, sigma: float, *,
                 seed: int = 0):
        super().__init__()
        self.top_dim, self.bottom_dim = top_dim, bottom_dim
        self.num_classes = None
        generator = seeded_generator(derive_seed(seed, "linear-gaussian-hierarchy"))

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        # generative model: p(z1 | z2) and, through the library's decoder, p(x | z1)
        self.top_to_bottom = nn.Parameter(draw(bottom_dim, top_dim))  # (D1, D2) A
        self.bottom_offset = nn.Parameter(0.5 * draw(bottom_dim))  # (D1,) c
        self.bottom_log_scale = nn.Parameter(torch.log(0.5 + torch.rand(
            bottom_dim, generator=generator, dtype=torch.float64)))  # (D1,) log s
        self.likelihood = GaussianLikelihood((data_dim,), sigma)
        self.decoder = build_decoder("mlp", bottom_dim, [], self.likelihood.params_shape,
                                     (data_dim,), "relu")
        # inference: q(z2 | x) = N(R2 x + r2, L2 L2^T), q(z1 | x, z2) = N(R1 x + G z2 + r1, L1 L1^T)
        self.top_weight = nn.Parameter(torch.zeros(top_dim, data_dim))
        self.top_bias = nn.Parameter(torch.zeros(top_dim))
        self.top_scale_tril = nn.Parameter(torch.eye(top_dim))
        self.bottom_weight = nn.Parameter(torch.zeros(bottom_dim, data_dim))
        self.bottom_from_top = nn.Parameter(torch.zeros(bottom_dim, top_dim))
        self.bottom_bias = nn.Parameter(torch.zeros(bottom_dim))
        self.bottom_scale_tril = nn.Parameter(torch.eye(bottom_dim))
        self.double()
        decoder = _linear_layer(self.decoder, "decoder")
        with torch.no_grad():
            decoder.weight.copy_(draw(data_dim, bottom_dim))
            decoder.bias.copy_(draw(data_dim))
        set_exact_posterior_hierarchy(self)

    # --- the latent interface (latent.py) ----------------------------------------------------
    @property
    def latent_groups(self) -> tuple[tuple[str, int], ...]:
        return (("z2", self.top_dim), ("z1", self.bottom_dim))  # top-down: z2 is drawn first

    @property
    def latent_dim(self) -> int:
        return self.top_dim + self.bottom_dim

    @property
    def code_dim(self) -> int:
        return self.bottom_dim  # the decoder reads z1

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.likelihood.event_shape

    def condition(self, y: Tensor | None) -> None:
        if y is not None:
            raise ValueError("this model is not conditional: call it without y")
        return None

    def decode(self, code: Tensor, y: Tensor | None = None) -> Distribution:
        """p(x | z1) for codes z1 (..., B, D1)."""
        return self.likelihood(self.decoder(code, self.condition(y)))

    def bottom_prior(self, z2: Tensor) -> MultivariateNormal:
        """p(z1 | z2) for z2 (..., B, D2): batch (..., B), event (D1,)."""
        loc = z2 @ self.top_to_bottom.T + self.bottom_offset  # (..., B, D1)
        return MultivariateNormal(loc, scale_tril=torch.diag(self.bottom_log_scale.exp()),
                                  validate_args=False)

    def top_prior(self) -> MultivariateNormal:
        """p(z2) = N(0, I)."""
        eye = torch.eye(self.top_dim, dtype=torch.float64, device=self.top_bias.device)
        return MultivariateNormal(torch.zeros_like(self.top_bias), scale_tril=eye,
                                  validate_args=False)

    def infer(self, x: Tensor, y: Tensor | None = None) -> "HierarchyInference":
        self.condition(y)
        return HierarchyInference(self, x.double().reshape(len(x), -1))

    def prior_draws(self) -> "HierarchyPrior":
        return HierarchyPrior(self)

    def prior_variance(self) -> Tensor:
        """Var_p of every latent coordinate, z2 then z1 (D,): 1, and diag(A A^T) + s^2."""
        bottom = self.top_to_bottom.square().sum(-1) + (2 * self.bottom_log_scale).exp()
        return torch.cat([torch.ones_like(self.top_bias), bottom]).detach()

    def sample(self, n: int) -> Tensor:
        """n examples x ~ p(x), ancestrally (the global RNG). (n, D_x)"""
        eps = torch.randn(n, self.latent_dim, dtype=torch.float64)
        return self.decode(self.prior_draws().code(eps)).sample()

    # --- exact answers -----------------------------------------------------------------------
    def gaussian_parts(self) -> dict[str, Tensor]:
        """The generative model's numbers (detached): A, c, s^2, W, b, sigma^2."""
        decoder = _linear_layer(self.decoder, "decoder")
        return {"A": self.top_to_bottom.detach(), "c": self.bottom_offset.detach(),
                "s2": (2 * self.bottom_log_scale.detach()).exp(), "W": decoder.weight.detach(),
                "b": decoder.bias.detach(),
                "sigma2": (2 * self.likelihood.log_scale.detach()).exp().reshape(-1)}

    def exact_marginal(self) -> MultivariateNormal:
        """p(x) = N(W c + b, W (A A^T + diag(s^2)) W^T + diag(sigma^2))."""
        g = self.gaussian_parts()
        bottom = g["A"] @ g["A"].T + torch.diag(g["s2"])  # (D1, D1) Cov(z1)
        covariance = g["W"] @ bottom @ g["W"].T + torch.diag(g["sigma2"])  # (D_x, D_x)
        return MultivariateNormal(g["W"] @ g["c"] + g["b"], covariance_matrix=covariance)

    def exact_log_px(self, x: Tensor) -> Tensor:
        """log p(x) for x (B, D_x), in nats. (B,) float64"""
        return self.exact_marginal().log_prob(x.detach().double().reshape(len(x), -1))

    def exact_skip_bound(self, x: Tensor) -> Tensor:
        """Havtorn et al.'s L^{>1}(x) in closed form, for the model's own q(z2 | x) = N(m, S):

            E_{q(z2|x) p(z1|z2)}[log p(x | z1)] - KL(q(z2 | x) || p(z2))

        where z1 is then N(A m + c, C), C = A S A^T + diag(s^2), and the expected Gaussian
        log-density is log N(x; W (A m + c) + b, diag(sigma^2)) - tr(W C W^T / sigma^2) / 2.
        x (B, D_x) -> (B,) float64"""
        g = self.gaussian_parts()
        x = x.detach().double().reshape(len(x), -1)
        with torch.no_grad():
            m = self.infer(x).top.loc  # (B, D2)
            scale = torch.tril(self.top_scale_tril)  # (D2, D2), the same for every x
        s_cov = scale @ scale.T  # (D2, D2)
        z1_cov = g["A"] @ s_cov @ g["A"].T + torch.diag(g["s2"])  # (D1, D1)
        mean_x = (m @ g["A"].T + g["c"]) @ g["W"].T + g["b"]  # (B, D_x)
        noise = Normal(mean_x, g["sigma2"].sqrt())
        spread = torch.diagonal(g["W"] @ z1_cov @ g["W"].T) / g["sigma2"]  # (D_x,)
        expected = noise.log_prob(x).sum(-1) - 0.5 * spread.sum()  # (B,)
        kl = 0.5 * (torch.trace(s_cov) + m.square().sum(-1) - self.top_dim
                    - torch.logdet(s_cov))  # (B,)
        return expected - kl

    def exact_posterior(self, x: Tensor) -> MultivariateNormal:
        """p(z2, z1 | x) for x (B, D_x): one Gaussian over (z2, z1) side by side (D,)."""
        gain, offset, covariance = _joint_posterior(self.gaussian_parts(), self.top_dim)
        loc = x.detach().double().reshape(len(x), -1) @ gain.T + offset  # (B, D)
        return MultivariateNormal(loc, covariance_matrix=covariance)


class HierarchyInference(Inference):
    """q(z2 | x) computed once; each draw then makes z2, q(z1 | x, z2) and z1 from the noise."""

    def __init__(self, model: LinearGaussianHierarchy, x: Tensor):
        self.model = model
        self.x = x  # (B, D_x)
        self.top = MultivariateNormal(x @ model.top_weight.T + model.top_bias,
                                      scale_tril=torch.tril(model.top_scale_tril),
                                      validate_args=False)  # batch (B,), event (D2,)

    def draw(self, eps: Tensor, inferred_groups: int | None = None) -> LatentDraw:
        """z2 and z1 from noise (..., B, D); inferred_groups=1 draws z1 from p(z1 | z2)."""
        model = self.model
        eps_top, eps_bottom = split_noise(eps.double(), [model.top_dim, model.bottom_dim])
        z2 = self.top.loc + (self.top.scale_tril @ eps_top.unsqueeze(-1)).squeeze(-1)
        prior = model.bottom_prior(z2)
        if inferred_groups == 1:
            bottom = prior  # the bottom group skipped: drawn from its prior given z2
        else:
            loc = self.x @ model.bottom_weight.T + z2 @ model.bottom_from_top.T \
                + model.bottom_bias  # (..., B, D1)
            bottom = MultivariateNormal(loc, scale_tril=torch.tril(model.bottom_scale_tril),
                                        validate_args=False)
        z1 = bottom.loc + (bottom.scale_tril @ eps_bottom.unsqueeze(-1)).squeeze(-1)  # (..., B, D1)
        return LatentDraw([LatentGroup("z2", z2, eps_top, self.top, model.top_prior()),
                           LatentGroup("z1", z1, eps_bottom, bottom, prior)], code=z1)


class HierarchyPrior:
    """Codes z1 ~ p(z1) drawn ancestrally from noise: z2 = eps_2, z1 = A z2 + c + s * eps_1."""

    needs_choice = False

    def __init__(self, model: LinearGaussianHierarchy):
        self.model = model

    def code(self, eps: Tensor, choice: Tensor | None = None) -> Tensor:
        model = self.model
        eps_top, eps_bottom = split_noise(eps.double(), [model.top_dim, model.bottom_dim])
        return model.bottom_prior(eps_top).loc + model.bottom_log_scale.exp() * eps_bottom


def _joint_posterior(g: dict[str, Tensor], top_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """p(u | x) = N(K x + k, P) for u = (z2, z1): returns K (D, D_x), k (D,), P (D, D)."""
    a, c, w = g["A"], g["c"], g["W"]
    bottom_dim = len(c)
    prior_mean = torch.cat([torch.zeros(top_dim, dtype=torch.float64), c])  # (D,)
    prior_cov = torch.cat([torch.cat([torch.eye(top_dim, dtype=torch.float64), a.T], 1),
                           torch.cat([a, a @ a.T + torch.diag(g["s2"])], 1)])  # (D, D)
    observe = torch.cat([torch.zeros(len(w), top_dim, dtype=torch.float64), w], 1)  # (D_x, D)
    scaled = observe / g["sigma2"][:, None]  # (D_x, D) S^-1 H
    prior_precision = torch.linalg.inv(prior_cov)
    covariance = torch.linalg.inv(prior_precision + observe.T @ scaled)  # (D, D)
    gain = covariance @ scaled.T  # (D, D_x)
    offset = covariance @ (prior_precision @ prior_mean) - gain @ g["b"]  # (D,)
    assert covariance.shape == (top_dim + bottom_dim,) * 2
    return gain, offset, covariance


def set_exact_posterior_hierarchy(model: LinearGaussianHierarchy) -> LinearGaussianHierarchy:
    """Make q(z2 | x) q(z1 | x, z2) the exact posterior p(z2 | x) p(z1 | x, z2)."""
    gain, offset, covariance = _joint_posterior(model.gaussian_parts(), model.top_dim)
    t = model.top_dim
    top_cov, cross = covariance[:t, :t], covariance[t:, :t]  # (D2, D2), (D1, D2)
    from_top = cross @ torch.linalg.inv(top_cov)  # (D1, D2): E[z1 | x, z2] moves with z2
    bottom_cov = covariance[t:, t:] - from_top @ cross.T  # (D1, D1)
    with torch.no_grad():
        model.top_weight.copy_(gain[:t])
        model.top_bias.copy_(offset[:t])
        model.top_scale_tril.copy_(torch.linalg.cholesky(top_cov))
        model.bottom_from_top.copy_(from_top)
        model.bottom_weight.copy_(gain[t:] - from_top @ gain[:t])
        model.bottom_bias.copy_(offset[t:] - from_top @ offset[:t])
        model.bottom_scale_tril.copy_(torch.linalg.cholesky(bottom_cov))
    return model
