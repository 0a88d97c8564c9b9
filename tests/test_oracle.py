"""The linear-Gaussian VAE oracle, checked against numerical integration and Bayes' rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from vaekit.model import ModelConfig, build_vae
from vaekit.objectives import elbo_terms
from vaekit.oracle import (
    exact_elbo,
    exact_log_px,
    exact_posterior,
    linear_gaussian_config,
    linear_gaussian_vae,
    linear_parts,
    sample_data,
    set_exact_posterior,
)


def one_latent_model(sigma: float = 0.7) -> torch.nn.Module:
    """A 3-d linear-Gaussian VAE with a 1-d latent: small enough to integrate over z on a grid."""
    model = build_vae(linear_gaussian_config((3,), 1, sigma))
    with torch.no_grad():
        model.decoder.net[0].weight.copy_(torch.tensor([[1.5], [-0.8], [0.4]]))
        model.decoder.net[0].bias.copy_(torch.tensor([0.2, -0.1, 0.5]))
    return model


def integrate_over_z(model, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log of the integral of p(x|z) p(z) dz by the trapezoid rule on [-12, 12]."""
    z = torch.linspace(-12, 12, 48001, dtype=torch.float64).unsqueeze(-1)  # (G, 1)
    parts = linear_parts(model)
    loc = z @ parts.weight.T + parts.bias  # (G, 3)
    likelihood = Independent(Normal(loc.unsqueeze(1), parts.variance.sqrt()), 1)
    log_joint = likelihood.log_prob(x.double()) + Normal(0.0, 1.0).log_prob(z)  # (G, B)
    step = float(z[1] - z[0])
    return torch.logsumexp(log_joint, dim=0) + math.log(step)  # (B,) (the ends are ~0)


def test_exact_log_px_equals_numerical_integration():
    model = one_latent_model()
    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 1.0], [-3.0, 2.0, 0.5]])
    assert torch.allclose(exact_log_px(model, x), integrate_over_z(model, x), atol=1e-8)


def test_exact_posterior_is_bayes_rule():
    model = one_latent_model()
    x = torch.tensor([[1.0, -0.5, 0.3]])
    parts = linear_parts(model)
    z = torch.tensor([[-1.0], [0.0], [0.4], [2.0]], dtype=torch.float64)  # (4, 1)
    log_likelihood = Independent(Normal(z @ parts.weight.T + parts.bias,
                                        parts.variance.sqrt()), 1).log_prob(x.double())
    bayes = log_likelihood + Normal(0.0, 1.0).log_prob(z[:, 0]) - exact_log_px(model, x)
    posterior = exact_posterior(model, x)
    assert torch.allclose(posterior.log_prob(z), bayes, atol=1e-10)


def test_exact_posterior_makes_the_elbo_equal_log_px_and_keeps_p_x():
    torch.manual_seed(0)
    # a W without orthogonal columns: set_exact_posterior must rotate the latent space first
    model = build_vae(linear_gaussian_config((6,), 3, 0.4))
    x = torch.randn(50, 6) * 2
    before = exact_log_px(model, x)
    set_exact_posterior(model)
    assert torch.allclose(exact_log_px(model, x), before, atol=1e-5)  # p(x) is unchanged
    terms = exact_elbo(model, x)
    assert torch.allclose(terms.elbo, before, atol=1e-4)
    # and the encoder gives the true posterior's mean and scale
    truth = exact_posterior(model, x)
    q = model.encode(x)
    assert torch.allclose(q.mean.double(), truth.mean, atol=1e-4)
    assert torch.allclose(q.variance.double(), torch.diagonal(truth.covariance_matrix, dim1=-2,
                                                              dim2=-1), atol=1e-5)


def test_exact_elbo_is_the_mean_of_the_one_sample_elbo():
    model = linear_gaussian_vae(5, 2, 0.5, seed=1)
    with torch.no_grad():  # an imperfect encoder, so the ELBO is strictly below log p(x)
        model.encoder.net[0].bias[2:] += 0.5
        model.encoder.net[0].weight[:2] *= 0.7
    x = sample_data(model, 4, seed=2)
    exact = exact_elbo(model, x).elbo.detach()
    torch.manual_seed(3)
    with torch.no_grad():  # 20,000 one-sample ELBOs per example at once: eps (S, B, D)
        draws = elbo_terms(model, x, torch.randn(20000, 4, 2)).elbo.double()  # (S, B)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert torch.all((mean - exact).abs() < 4 * se)
    assert torch.all(exact < exact_log_px(model, x) - 0.05)


def test_linear_gaussian_vae_has_orthogonal_columns_and_the_exact_posterior():
    model = linear_gaussian_vae(8, 3, 0.3, seed=5, column_scales=[1.0, 2.0, 4.0])
    weight = linear_parts(model).weight
    gram = weight.T @ weight
    assert torch.allclose(gram, torch.diag(torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)),
                          atol=1e-5)
    x = sample_data(model, 10, seed=0)
    assert x.shape == (10, 8)
    assert torch.allclose(exact_elbo(model, x).elbo, exact_log_px(model, x), atol=1e-4)


def test_only_linear_gaussian_models_are_accepted():
    for config in (ModelConfig(data_shape=(4,), latent_dim=2, hidden=[8], likelihood="gaussian"),
                   ModelConfig(data_shape=(4,), latent_dim=2, hidden=[], likelihood="bernoulli"),
                   ModelConfig(data_shape=(4,), latent_dim=2, hidden=[], likelihood="gaussian",
                               prior="uniform")):
        with pytest.raises(ValueError, match="not a linear-Gaussian VAE"):
            exact_log_px(build_vae(config), torch.zeros(1, 4))
