"""Priors, posteriors and likelihoods: shapes, support, normalisation and KL against Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from vaekit.distributions import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    GaussianPosterior,
    SigmoidGaussianPosterior,
    StandardNormalPrior,
    UniformPrior,
    build_likelihood,
    build_prior,
    has_exact_kl,
    kl_or_estimate,
    log_ratio_per_dimension,
    posterior_mean_code,
    reparameterize,
)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("latent_dim", [1, 3, 20])
@pytest.mark.parametrize("posterior_cls", [GaussianPosterior, SigmoidGaussianPosterior])
def test_posterior_shapes(batch, latent_dim, posterior_cls):
    q = posterior_cls(latent_dim)(torch.randn(batch, 2 * latent_dim))
    assert q.batch_shape == (batch,) and q.event_shape == (latent_dim,)
    z = q.rsample()
    assert z.shape == (batch, latent_dim)
    assert q.log_prob(z).shape == (batch,)
    assert q.rsample((7,)).shape == (7, batch, latent_dim)


@pytest.mark.parametrize("event_shape", [(6,), (1, 8, 8), (3, 5, 4)])
@pytest.mark.parametrize("name", ["bernoulli", "continuous-bernoulli", "gaussian"])
def test_likelihood_event_shapes(event_shape, name):
    likelihood = build_likelihood(name, event_shape)
    params = torch.randn(4, *likelihood.params_shape)
    px = likelihood(params)
    assert px.batch_shape == (4,) and px.event_shape == event_shape
    x = px.sample()
    assert px.log_prob(x).shape == (4,)
    assert likelihood.check_support(x) is None


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="normal, uniform"):
        build_prior("cauchy", 2)
    with pytest.raises(ValueError, match="bernoulli"):
        build_likelihood("poisson", (3,))


def test_priors_sample_their_support():
    torch.manual_seed(0)
    normal = StandardNormalPrior(4)()
    uniform = UniformPrior(4)()
    assert normal.sample((3,)).shape == (3, 4)
    u = uniform.sample((10_000,))
    assert bool(((u >= 0) & (u <= 1)).all())
    # the uniform density on the unit cube is 1 everywhere inside
    inside = torch.tensor([[0.0, 0.999, 0.5, 0.25]])
    assert torch.allclose(uniform.log_prob(inside), torch.zeros(1))
    assert uniform.log_prob(torch.tensor([[1.5, 0.5, 0.5, 0.5]])).item() == -math.inf


def test_exact_kl_matches_monte_carlo_within_standard_errors():
    """KL(N(mu, s^2) || N(0, 1)) in closed form equals the mean of log q(z) - log p(z), z ~ q."""
    torch.manual_seed(1)
    latent_dim, n = 5, 200_000
    q = GaussianPosterior(latent_dim)(torch.randn(3, 2 * latent_dim))
    p = StandardNormalPrior(latent_dim)()
    assert has_exact_kl(q, p)
    exact = kl_or_estimate(q, p, q.rsample())  # (3,)
    z = q.sample((n,))  # (n, 3, D)
    samples = q.log_prob(z) - p.log_prob(z)  # (n, 3)
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(n)
    assert torch.all((exact - mc).abs() < 4 * se), (exact, mc, se)
    # and the closed form itself, per dimension: log(1/s) + (s^2 + mu^2 - 1) / 2
    base = q.base_dist
    by_hand = (-base.scale.log() + (base.scale ** 2 + base.loc ** 2 - 1) / 2).sum(-1)
    assert torch.allclose(exact, by_hand, atol=1e-5)


def test_uniform_prior_kl_is_monte_carlo_and_agrees_with_quadrature():
    """KL(sigmoid(N(m, s^2)) || U(0, 1)) = E_u[log N(u) - log sigmoid'(u)]: check the estimator
    against a fine quadrature of that integral, per dimension."""
    torch.manual_seed(2)
    posterior = SigmoidGaussianPosterior(2)
    params = torch.tensor([[0.8, -1.5, 0.3, -0.2]])  # loc (0.8, -1.5), raw scales
    q, p = posterior(params), UniformPrior(2)()
    assert not has_exact_kl(q, p)
    n = 400_000
    z = q.rsample((n,))  # (n, 1, 2)
    estimates = kl_or_estimate(q, p, z)  # (n, 1)
    mc, se = estimates.mean().item(), (estimates.std() / math.sqrt(n)).item()

    loc, scale = q.base_dist.base_dist.loc[0].double(), q.base_dist.base_dist.scale[0].double()
    total = 0.0
    for m, s in zip(loc.tolist(), scale.tolist()):
        u = torch.linspace(m - 12 * s, m + 12 * s, 200_001, dtype=torch.float64)
        density = Normal(m, s).log_prob(u)
        log_jacobian = torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u)
        integrand = density.exp() * (density - log_jacobian)
        total += torch.trapezoid(integrand, u).item()
    assert abs(mc - total) < 4 * se + 1e-4, (mc, total, se)


def test_sigmoid_posterior_log_prob_is_exact_where_the_sigmoid_saturates():
    q = SigmoidGaussianPosterior(1)(torch.tensor([[25.0, -3.0]]))  # sigmoid(25) rounds near 1
    z = reparameterize(q, torch.zeros(1, 1))  # the pre-image is exactly 25
    scale = torch.nn.functional.softplus(torch.tensor(-3.0))
    log_jacobian = torch.nn.functional.logsigmoid(torch.tensor(25.0)) + \
        torch.nn.functional.logsigmoid(torch.tensor(-25.0))
    exact = Normal(25.0, scale).log_prob(torch.tensor(25.0)) - log_jacobian
    assert abs(q.log_prob(z).item() - exact.item()) < 1e-4  # logit(z) would give about 16, not 25
    assert torch.isfinite(kl_or_estimate(q, UniformPrior(1)(), z)).all()


def test_reparameterize_equals_rsample_with_the_same_noise():
    params = torch.randn(4, 6)
    for posterior in (GaussianPosterior(3), SigmoidGaussianPosterior(3)):
        torch.manual_seed(5)
        z_torch = posterior(params).rsample()
        torch.manual_seed(5)
        eps = torch.randn(4, 3)
        assert torch.allclose(reparameterize(posterior(params), eps), z_torch, atol=1e-6)


def test_reparameterisation_carries_gradients_to_the_encoder_outputs():
    params = torch.randn(2, 4, requires_grad=True)
    z = reparameterize(GaussianPosterior(2)(params), torch.randn(2, 2))
    z.sum().backward()
    assert params.grad is not None and bool((params.grad != 0).all())


def test_posterior_mean_code():
    params = torch.tensor([[0.5, -1.0, 1.0, 1.0]])
    assert torch.allclose(posterior_mean_code(GaussianPosterior(2)(params)),
                          torch.tensor([[0.5, -1.0]]))
    squashed = posterior_mean_code(SigmoidGaussianPosterior(2)(params))
    assert torch.allclose(squashed, torch.sigmoid(torch.tensor([[0.5, -1.0]])))


@pytest.mark.parametrize("prior_name", ["normal", "uniform"])
def test_log_ratio_per_dimension_equals_the_log_densities(prior_name):
    torch.manual_seed(0)
    prior = build_prior(prior_name, 3)()
    posterior = (GaussianPosterior if prior_name == "normal" else SigmoidGaussianPosterior)(3)
    q = posterior(torch.randn(4, 6) * 2)  # batch (4,), event (3,)
    eps = torch.randn(50, 4, 3)
    z = reparameterize(q, eps)  # (50, 4, 3)
    ratio = log_ratio_per_dimension(q, prior, z, eps)
    assert ratio.shape == (50, 4, 3)
    # the sum over dimensions is log q(z|x) - log p(z), computed in float64 from z itself
    exact = (q.log_prob(z).double() - prior.log_prob(z).double())  # (50, 4)
    assert torch.allclose(ratio.double().sum(-1), exact, atol=1e-4, rtol=1e-5)


def test_bernoulli_mass_sums_to_one():
    likelihood = BernoulliLikelihood((2,))
    px = likelihood(torch.tensor([[0.3, -2.0]]))
    values = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    total = torch.logsumexp(px.log_prob(values.unsqueeze(1)).squeeze(1), 0).exp()
    assert abs(total.item() - 1.0) < 1e-6


@pytest.mark.parametrize("event_shape", [(6,), (1, 4, 5)])
def test_bernoulli_scorer_equals_the_distribution_log_prob(event_shape):
    torch.manual_seed(0)
    likelihood = BernoulliLikelihood(event_shape)
    x = (torch.rand(3, *event_shape) < 0.4).float()  # (B, *event): binary examples
    logits = torch.randn(7, 3, *event_shape) * 6  # (S, B, *event): codes decoded per example
    logits.view(-1)[:4] = torch.tensor([-95.0, 60.0, -30.0, 25.0])  # far out in both tails
    expected = likelihood(logits.double()).log_prob(x.double())  # (S, B), float64
    scored = likelihood.scorer(x)(logits)
    assert scored.shape == (7, 3) and scored.dtype == torch.float32
    # float32 rounding of sums of about |log p| nats: within 1e-6 relative
    assert torch.allclose(scored.double(), expected, rtol=1e-6, atol=1e-4)
    # probabilities, not just agreement with torch: logsumexp over both values of one pixel is 0
    pixel = torch.tensor([[0.0], [1.0]])  # (2, 1): the two values of a one-pixel example
    both = torch.stack([BernoulliLikelihood((1,)).scorer(v.view(1, 1))(torch.tensor([[1.7]]))
                        for v in pixel])
    assert abs(float(torch.logsumexp(both.flatten(), 0))) < 1e-6


def test_bernoulli_scorer_adds_a_bias_to_the_logits():
    torch.manual_seed(1)
    likelihood = BernoulliLikelihood((1, 2, 3))
    x = (torch.rand(4, 1, 2, 3) < 0.5).float()  # (B, *event)
    logits, bias = torch.randn(5, 4, 1, 2, 3) * 3, torch.randn(6) * 2  # bias per pixel, flat
    expected = likelihood(logits + bias.view(1, 2, 3)).log_prob(x)  # (5, 4)
    assert torch.allclose(likelihood.scorer(x, bias)(logits.clone()), expected, atol=1e-5)
    grey = torch.full((4, 1, 2, 3), 0.3)  # not binary: the distribution's formula, same bias
    assert torch.allclose(likelihood.scorer(grey, bias)(logits.clone()),
                          likelihood(logits + bias.view(1, 2, 3)).log_prob(grey))


def test_bernoulli_scorer_of_non_binary_values_uses_the_distribution_formula():
    likelihood = BernoulliLikelihood((4,))
    x = torch.tensor([[0.0, 0.25, 1.0, 0.5]])  # (1, 4): grey values (a BCE-style score)
    logits = torch.randn(5, 1, 4)
    assert torch.equal(likelihood.scorer(x)(logits), likelihood(logits).log_prob(x))


@pytest.mark.parametrize("logit", [-4.0, -0.3, 0.0, 1e-4, 2.5])
def test_continuous_bernoulli_density_integrates_to_one(logit):
    px = ContinuousBernoulliLikelihood((1,))(torch.tensor([[logit]]))
    x = torch.linspace(0, 1, 100_001, dtype=torch.float64).view(-1, 1, 1)
    density = px.log_prob(x.float()).double().exp().view(-1)
    assert abs(torch.trapezoid(density, x.view(-1)).item() - 1.0) < 1e-4


def test_gaussian_likelihood_learned_and_fixed_scale():
    learned = GaussianLikelihood((3,))
    fixed = GaussianLikelihood((3,), scale=0.5)
    assert learned.log_scale.requires_grad and "log_scale" in dict(learned.named_parameters())
    assert "log_scale" not in dict(fixed.named_parameters())
    px = fixed(torch.zeros(1, 3))
    # N(0, 0.25) at 0: -0.5 log(2 pi 0.25) per dimension
    assert abs(px.log_prob(torch.zeros(1, 3)).item() - 3 * -0.5 * math.log(2 * math.pi * 0.25)) \
        < 1e-5


def test_support_checks_name_the_problem():
    assert "0 and 1" in BernoulliLikelihood((2,)).check_support(torch.tensor([[0.5, 1.0]]))
    assert "[0, 1]" in ContinuousBernoulliLikelihood((1,)).check_support(torch.tensor([[1.5]]))
    assert "finite" in GaussianLikelihood((1,)).check_support(torch.tensor([[math.nan]]))
