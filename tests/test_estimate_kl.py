"""estimate.kl_per_dimension: exact against closed forms, Monte Carlo against quadrature."""

from __future__ import annotations

import numpy as np
import torch
from torch.distributions import kl_divergence

from vaekit.data import Pipeline
from vaekit.distributions import base_normal
from vaekit.estimate import kl_per_dimension
from vaekit.model import ModelConfig, build_vae


def model_and_data(prior: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_vae(ModelConfig(data_shape=(6,), latent_dim=3, hidden=[16], prior=prior,
                                  likelihood="gaussian")).eval()
    raw = torch.randn(40, 6) * 2  # spread inputs: posteriors far from the prior and each other
    return model, raw, Pipeline("identity", "real", 0)


def test_normal_prior_is_exact_and_sums_to_the_total_kl():
    model, raw, pipeline = model_and_data("normal")
    kl = kl_per_dimension(model, raw, pipeline, batch_size=7)  # chunks must not matter
    assert kl.shape == (40, 3) and kl.dtype == torch.float64
    with torch.no_grad():
        q = model.encode(raw)
        total = kl_divergence(q, model.prior)  # (40,)
        inner = base_normal(q)
        mu, var = inner.loc.double(), inner.scale.double() ** 2
    torch.testing.assert_close(kl.sum(1), total.double(), rtol=1e-5, atol=1e-6)
    closed_form = 0.5 * (var + mu ** 2 - 1 - var.log())  # KL(N(mu, var) || N(0, 1))
    torch.testing.assert_close(kl, closed_form, rtol=1e-5, atol=1e-6)


def test_uniform_prior_monte_carlo_agrees_with_quadrature_within_its_standard_error():
    model, raw, pipeline = model_and_data("uniform")
    samples = 64
    kl = kl_per_dimension(model, raw, pipeline, samples=samples, seed=3)  # (40, 3)
    with torch.no_grad():
        inner = base_normal(model.encode(raw))
        mu, sigma = inner.loc.double().numpy(), inner.scale.double().numpy()
    # z = sigmoid(y), y ~ N(mu, sigma): KL(q || U(0, 1)) = E[log q(z)]
    #   = -H(N(mu, sigma)) + E[softplus(y) + softplus(-y)], the expectation by Gauss-Hermite.
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    y = mu[..., None] + np.sqrt(2) * sigma[..., None] * nodes  # (40, 3, 80)
    softplus = np.logaddexp(0, y) + np.logaddexp(0, -y)
    expected = -0.5 * np.log(2 * np.pi * np.e * sigma ** 2) + (softplus * weights).sum(-1) \
        / np.sqrt(np.pi)  # (40, 3)
    # Each row of kl averages `samples` draws: compare the mean over examples per dimension,
    # with a standard error from the spread of the per-example errors.
    error = kl.numpy() - expected  # (40, 3)
    standard_error = error.std(0, ddof=1) / np.sqrt(len(error))
    assert np.all(np.abs(error.mean(0)) < 4 * standard_error + 1e-9), (error.mean(0),
                                                                       standard_error)
    assert np.all(expected > 0)
    # the same seed draws the same noise: a deterministic estimate
    torch.testing.assert_close(kl, kl_per_dimension(model, raw, pipeline, samples=samples,
                                                    seed=3, batch_size=9))
