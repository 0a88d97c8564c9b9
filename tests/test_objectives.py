"""The ELBO: its two terms, computed by hand, and the gradient the reparameterisation gives."""

from __future__ import annotations

import math

import torch

from vaekit.model import ModelConfig, build_vae
from vaekit.objectives import elbo_terms


def test_elbo_is_its_two_terms_computed_by_hand():
    torch.manual_seed(0)
    model = build_vae(ModelConfig(data_shape=(5,), latent_dim=2, hidden=[7],
                                  likelihood="bernoulli"))
    x = torch.bernoulli(torch.full((4, 5), 0.4))
    eps = torch.randn(4, 2)
    terms = elbo_terms(model, x, eps)
    assert terms.elbo.shape == (4,)
    assert torch.allclose(terms.elbo, terms.reconstruction - terms.kl)

    # by hand: encoder -> (mu, softplus(raw)), z = mu + sigma * eps, Bernoulli log-likelihood
    params = model.encoder(x)
    mu, sigma = params[:, :2], torch.nn.functional.softplus(params[:, 2:])
    z = mu + sigma * eps
    logits = model.decoder(z)
    log_px_z = (x * torch.nn.functional.logsigmoid(logits)
                + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    kl = (-sigma.log() + (sigma ** 2 + mu ** 2 - 1) / 2).sum(-1)
    assert torch.allclose(terms.reconstruction, log_px_z, atol=1e-5)
    assert torch.allclose(terms.kl, kl, atol=1e-5)
    assert torch.all(terms.kl >= 0)


def test_weighted_objective_is_beta_elbo():
    model = build_vae(ModelConfig(data_shape=(3,), latent_dim=2, hidden=[], likelihood="gaussian",
                                  gaussian_scale=1.0))
    terms = elbo_terms(model, torch.randn(6, 3))
    assert torch.allclose(terms.weighted(1.0), terms.elbo)
    assert torch.allclose(terms.weighted(4.0), terms.reconstruction - 4 * terms.kl)


def test_uniform_prior_elbo_uses_monte_carlo_kl():
    torch.manual_seed(3)
    model = build_vae(ModelConfig(data_shape=(4,), latent_dim=3, hidden=[8], prior="uniform",
                                  likelihood="gaussian"))
    x = torch.randn(2, 4)
    many = torch.stack([elbo_terms(model, x).kl for _ in range(4000)])  # (4000, 2)
    # the one-sample estimate of KL(q || U) = E_q[log q(z)] is unbiased: its mean is stable and,
    # KL being non-negative, the mean is positive
    assert torch.all(many.mean(0) > 0)
    assert many.std(0).min() > 0  # it is an estimate, not a closed form


def test_linear_gaussian_elbo_is_exact_log_likelihood_with_the_true_posterior():
    """pPCA with orthogonal W: setting q to the exact posterior makes ELBO == log p(x) for any eps."""
    torch.manual_seed(4)
    data_dim, latent_dim, sigma = 4, 2, 0.5
    model = build_vae(ModelConfig(data_shape=(data_dim,), latent_dim=latent_dim, hidden=[],
                                  likelihood="gaussian", gaussian_scale=sigma))
    w = torch.linalg.qr(torch.randn(data_dim, latent_dim))[0] * torch.tensor([2.0, 0.7])
    b = torch.randn(data_dim)
    decoder = model.decoder.net[0]
    decoder.weight.data, decoder.bias.data = w.clone(), b.clone()
    # exact posterior: cov = sigma^2 (W^T W + sigma^2 I)^-1 (diagonal), mean = cov W^T (x - b) / s^2
    wtw = (w * w).sum(0)  # (D,) diagonal of W^T W
    post_var = sigma ** 2 / (wtw + sigma ** 2)
    encoder = model.encoder.net[0]
    encoder.weight.data = torch.cat([(post_var / sigma ** 2)[:, None] * w.T,
                                     torch.zeros(latent_dim, data_dim)])
    raw_scale = torch.log(torch.expm1(post_var.sqrt()))  # softplus^-1
    encoder.bias.data = torch.cat([-(post_var / sigma ** 2) * (w.T @ b), raw_scale])
    x = torch.randn(5, data_dim) * 2
    cov = w @ w.T + sigma ** 2 * torch.eye(data_dim)
    exact = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    # with the exact posterior, log p(x|z) + log p(z) - log q(z|x) = log p(x) for every z ...
    q = model.encode(x)
    for _ in range(3):
        z = q.rsample()
        sample_bound = model.decode(z).log_prob(x) + model.prior.log_prob(z) - q.log_prob(z)
        assert torch.allclose(sample_bound, exact, atol=1e-4)
    # ... so the ELBO (analytic KL, one-sample reconstruction) equals it in expectation
    n = 20_000
    eps = torch.randn(n, 5, latent_dim)
    elbos = torch.stack([elbo_terms(model, x, e).elbo for e in eps]).detach()  # (n, 5)
    se = elbos.std(0) / math.sqrt(n)
    assert torch.all((elbos.mean(0) - exact).abs() < 4 * se + 1e-4)
