"""Priors, posteriors and likelihoods: shapes, support, normalisation and KL against Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from vaekit.distributions import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiagonalGaussianMixture,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    GaussianLikelihood,
    GreyLevels,
    LevelCategorical,
    MixturePrior,
    StandardNormalPrior,
    UniformPrior,
    build_likelihood,
    build_prior,
    has_exact_kl,
    kl_or_estimate,
    kl_per_dimension,
    log_ratio_per_dimension,
    posterior_mean_code,
    reparameterize,
)
from vaekit.posteriors import GaussianPosterior, SigmoidGaussianPosterior, build_posterior


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


# ------------------------------------------------------------------------------------------------
# Mixture and VampPrior priors


def _quadrature_kl(q, p, half_width: float = 9.0, points: int = 801) -> float:
    """KL(q || p) for a 2-D Gaussian q (batch of one) by the trapezoid rule on a grid."""
    loc, scale = q.base_dist.loc[0].double(), q.base_dist.scale[0].double()
    axes = [torch.linspace(m - half_width * s, m + half_width * s, points, dtype=torch.float64)
            for m, s in zip(loc.tolist(), scale.tolist())]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)  # (P^2, 2)
    log_q = Normal(loc, scale).log_prob(grid).sum(-1)
    log_p = p.log_prob(grid.float().unsqueeze(1)).squeeze(1).double()  # p in float32, as used
    integrand = (log_q.exp() * (log_q - log_p)).reshape(points, points)
    return torch.trapezoid(torch.trapezoid(integrand, axes[1], dim=1), axes[0]).item()


def _monte_carlo_kl(q, p, n: int = 200_000) -> tuple[float, float]:
    z = q.rsample((n,))  # (n, 1, 2)
    estimates = kl_or_estimate(q, p, z)  # (n, 1): the library's one-sample estimate
    return estimates.mean().item(), (estimates.std() / math.sqrt(n)).item()


def test_mixture_prior_kl_is_monte_carlo_and_agrees_with_quadrature():
    torch.manual_seed(3)
    prior = MixturePrior(2, components=3)
    with torch.no_grad():
        prior.log_scale.copy_(torch.tensor([[-0.5, 0.2], [0.3, -0.8], [0.0, 0.0]]))
        prior.logits.copy_(torch.tensor([0.5, -1.0, 0.2]))
    q = GaussianPosterior(2)(torch.tensor([[0.4, -0.7, -0.5, 0.3]]))
    p = prior()
    assert not has_exact_kl(q, p)
    mc, se = _monte_carlo_kl(q, p)
    exact = _quadrature_kl(q, p)
    assert exact > 0 and abs(mc - exact) < 4 * se + 1e-3, (mc, exact, se)


def test_mixture_prior_density_is_the_weighted_sum_of_its_components():
    torch.manual_seed(4)
    prior = MixturePrior(3, components=4)
    z = torch.randn(10, 3)
    weights = torch.softmax(prior.logits, 0)  # (K,)
    densities = Normal(prior.loc, prior.log_scale.exp()).log_prob(z.unsqueeze(1)).sum(-1).exp()
    by_hand = (densities * weights).sum(-1).log()  # (10,)
    assert torch.allclose(prior().log_prob(z), by_hand, atol=1e-5)
    assert {name for name, _ in prior.named_parameters()} == {"loc", "log_scale", "logits"}


@pytest.mark.parametrize("sharpest", [1.0, 1e-2, 1e-4])
def test_diagonal_gaussian_mixture_density_matches_torch_in_float64(sharpest):
    """The matrix-product log density agrees with MixtureSameFamily, also for sharp components
    evaluated right at their means, where the expansion could cancel."""
    from torch.distributions import Categorical, Independent, MixtureSameFamily

    torch.manual_seed(13)
    logits, loc = torch.randn(30), torch.randn(30, 8) * 3
    scale = torch.rand(30, 8) * 0.5 + sharpest
    reference = MixtureSameFamily(Categorical(logits=logits.double()),
                                  Independent(Normal(loc.double(), scale.double()), 1))
    mixture = DiagonalGaussianMixture(logits, loc, scale)
    near = loc[:6] + scale[:6] * torch.randn(4, 6, 8)  # (4, 6, 8): inside components
    far = torch.randn(5, 8) * 4
    for z in (near, far):
        expected = reference.log_prob(z.double())
        assert mixture.log_prob(z).shape == z.shape[:-1]
        assert torch.allclose(mixture.log_prob(z).double(), expected, rtol=1e-6, atol=1e-4)
    assert mixture.sample((3,)).shape == (3, 8)


def _vamp_model(components: int = 4):
    from vaekit.model import ModelConfig, build_vae

    return build_vae(ModelConfig(data_shape=(3,), latent_dim=2, hidden=[8], prior="vamp",
                                 prior_components=components, likelihood="gaussian"))


def test_vamp_prior_is_the_posterior_averaged_over_pseudo_inputs():
    torch.manual_seed(5)
    model = _vamp_model(components=4)
    with torch.no_grad():
        model.prior_module.pseudo_inputs.copy_(torch.randn(4, 3) * 2)
    z = torch.randn(7, 2)
    components = model.encode(model.prior_module.pseudo_inputs)  # batch (K,)
    by_hand = torch.logsumexp(components.log_prob(z.unsqueeze(1)), dim=1) - math.log(4)  # (7,)
    assert torch.allclose(model.prior.log_prob(z), by_hand, atol=1e-5)


def test_vamp_prior_kl_is_monte_carlo_and_agrees_with_quadrature():
    torch.manual_seed(6)
    model = _vamp_model(components=5)
    with torch.no_grad():
        model.prior_module.pseudo_inputs.copy_(torch.randn(5, 3) * 2)
        q = model.encode(torch.randn(1, 3))
        p = model.prior
        assert not has_exact_kl(q, p)
        mc, se = _monte_carlo_kl(q, p)
        exact = _quadrature_kl(q, p)
    assert exact > 0 and abs(mc - exact) < 4 * se + 1e-3, (mc, exact, se)


def test_vamp_prior_shares_the_encoder_and_gives_it_gradients():
    model = _vamp_model()
    names = list(model.state_dict())
    assert [n for n in names if n.startswith("prior_module")] == ["prior_module.pseudo_inputs"]
    assert sum(n.startswith("encoder.") for n in names) == len(list(model.encoder.state_dict()))
    # the prior's density is differentiable in the encoder's weights and the pseudo-inputs
    model.prior.log_prob(torch.randn(4, 2)).sum().backward()
    assert model.prior_module.pseudo_inputs.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.parametrize("name", ["mixture", "vamp"])
def test_new_priors_sample_through_model_prior(name):
    from vaekit.model import ModelConfig, build_vae

    torch.manual_seed(7)
    model = build_vae(ModelConfig(data_shape=(3,), latent_dim=2, hidden=[8], prior=name,
                                  prior_components=3, likelihood="gaussian"))
    prior = model.prior
    n = 100_000
    z = prior.sample((n,))
    assert z.shape == (n, 2)
    # the mixture's mean is the weighted mean of its components' means
    weights = prior.mixture_distribution.probs  # (K,)
    expected = (weights[:, None] * prior.component_distribution.mean).sum(0).detach()
    se = z.std(0) / math.sqrt(n)
    assert torch.all((z.mean(0) - expected).abs() < 4 * se), (z.mean(0), expected)
    low, high = model.prior_module.range()
    assert ((z >= low) & (z <= high)).all(-1).double().mean() > 0.99  # the control's span


def test_build_prior_defaults_and_errors():
    assert build_prior("mixture", 4).loc.shape == (MixturePrior.default_components, 4)
    assert build_prior("vamp", 4, data_shape=(1, 5, 5)).pseudo_inputs.shape == (500, 1, 5, 5)
    assert build_prior("vamp", 4, components=7, data_shape=(6,)).components == 7
    with pytest.raises(ValueError, match="data_shape"):
        build_prior("vamp", 4)
    with pytest.raises(RuntimeError, match="encoder"):
        build_prior("vamp", 2, data_shape=(3,))()  # no encoder attached


def test_kl_per_dimension_sums_to_the_kl():
    torch.manual_seed(8)
    q = GaussianPosterior(3)(torch.randn(5, 6))
    z = q.rsample()
    per_dim = kl_per_dimension(q, StandardNormalPrior(3)(), z)
    assert per_dim.shape == (5, 3) and torch.all(per_dim >= 0)
    assert torch.allclose(per_dim.sum(-1), kl_or_estimate(q, StandardNormalPrior(3)(), z))
    squashed = SigmoidGaussianPosterior(3)(torch.randn(5, 6))
    z = reparameterize(squashed, torch.randn(5, 3))
    per_dim = kl_per_dimension(squashed, UniformPrior(3)(), z)
    assert torch.allclose(per_dim.sum(-1), kl_or_estimate(squashed, UniformPrior(3)(), z),
                          atol=1e-5)
    with pytest.raises(ValueError, match="factorises"):
        kl_per_dimension(q, MixturePrior(3)(), q.rsample())


# ------------------------------------------------------------------------------------------------
# Likelihoods of 8-bit levels

LEVEL_VALUES = torch.arange(256, dtype=torch.float64) / 255


def _logistic_params():
    loc = torch.tensor([-0.3, 0.0, 0.2, 0.5, 0.999, 1.4, 0.5, 0.7], dtype=torch.float64)
    scale = torch.tensor([0.01, 0.1, 1e-4, 2.0, 0.003, 0.05, 1e-6, 30.0], dtype=torch.float64)
    return loc, scale


def test_discretized_logistic_masses_sum_to_one_over_all_256_levels():
    loc, scale = _logistic_params()
    d = DiscretizedLogistic(loc, scale)
    values = d.enumerate_support()  # (256, 8)
    assert torch.equal(values[:, 0], LEVEL_VALUES)
    log_p = d.log_prob(values)
    assert torch.isfinite(log_p).all()
    assert torch.allclose(log_p.exp().sum(0), torch.ones(8, dtype=torch.float64), atol=1e-10)
    # in float32, as models use it
    d32 = DiscretizedLogistic(loc.float(), scale.float())
    assert torch.allclose(d32.log_prob(values.float()).exp().sum(0), torch.ones(8), atol=1e-4)


def test_discretized_logistic_matches_the_cdf_differences():
    loc, scale = torch.tensor([0.3, 0.62], dtype=torch.float64), \
        torch.tensor([0.05, 0.2], dtype=torch.float64)
    cdf = (lambda v: torch.sigmoid((v - loc) / scale))
    half = 0.5 / 255
    values = LEVEL_VALUES.unsqueeze(1)  # (256, 1)
    upper = torch.where(values > 1 - half, torch.ones(1, dtype=torch.float64), cdf(values + half))
    lower = torch.where(values < half, torch.zeros(1, dtype=torch.float64), cdf(values - half))
    expected = (upper - lower).log()
    assert torch.allclose(DiscretizedLogistic(loc, scale).log_prob(values), expected, atol=1e-9)


def test_discretized_logistic_mean_and_samples():
    torch.manual_seed(9)
    loc, scale = _logistic_params()
    d = DiscretizedLogistic(loc, scale)
    probs = d.log_prob(d.enumerate_support()).exp()  # (256, 8)
    assert torch.allclose(d.mean, (probs * LEVEL_VALUES[:, None]).sum(0), atol=1e-10)
    n = 50_000
    samples = d.sample((n,))  # (n, 8)
    assert samples.shape == (n, 8) and bool(GreyLevels().check(samples).all())
    # empirical frequencies agree with the masses within 5 binomial standard errors
    counts = torch.stack([(samples == v).sum(0) for v in LEVEL_VALUES]).double() / n  # (256, 8)
    se = (probs * (1 - probs) / n).sqrt()
    assert torch.all((counts - probs).abs() <= 5 * se + 1e-4)


def test_level_categorical_masses_mean_and_samples():
    torch.manual_seed(10)
    logits = torch.randn(3, 256, dtype=torch.float64)
    d = LevelCategorical(logits)
    values = d.enumerate_support()  # (256, 3)
    log_p = d.log_prob(values)
    assert torch.allclose(log_p.exp().sum(0), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(log_p, torch.log_softmax(logits, -1).T)  # level k scores logit k
    assert torch.allclose(d.mean, (log_p.exp() * LEVEL_VALUES[:, None]).sum(0))
    samples = d.sample((20_000,))
    assert bool(GreyLevels().check(samples).all())
    se = (d.variance / 20_000).sqrt()
    assert torch.all((samples.mean(0) - d.mean).abs() < 5 * se)


def _mixture(channels: int, components: int = 3, seed: int = 11, levels: int = 256):
    torch.manual_seed(seed)
    logits = torch.randn(components, 1, 1, dtype=torch.float64)  # one pixel
    loc = torch.rand(components, channels, 1, 1, dtype=torch.float64) * 1.4 - 0.2
    scale = torch.rand(components, channels, 1, 1, dtype=torch.float64) * 0.1 + 1e-3
    return DiscretizedLogisticMixture(logits, loc, scale, levels)


def test_logistic_mixture_grey_masses_sum_to_one_and_give_the_mean():
    d = _mixture(channels=1)
    assert d.batch_shape == () and d.event_shape == (1, 1, 1)
    values = LEVEL_VALUES.view(256, 1, 1, 1)
    probs = d.log_prob(values).exp()  # (256,)
    assert abs(probs.sum().item() - 1) < 1e-10
    assert abs(d.mean.item() - (probs * LEVEL_VALUES).sum().item()) < 1e-10
    samples = d.sample((40_000,)).view(-1)
    counts = torch.stack([(samples == v).sum() for v in LEVEL_VALUES]).double() / 40_000
    assert torch.all((counts - probs).abs() <= 5 * (probs * (1 - probs) / 40_000).sqrt() + 1e-4)


def test_logistic_mixture_rgb_masses_sum_to_one_over_all_colours():
    """Every colour of an RGB pixel. At 256 levels that is 256^3 = 16.8M colours, too slow for
    the suite, so the same code runs at 32 levels per channel (all 32^3 colours)."""
    d = _mixture(channels=3, levels=32)
    values = torch.arange(32, dtype=torch.float64) / 31
    colours = torch.stack(torch.meshgrid(values, values, values, indexing="ij"), dim=-1)
    total = d.log_prob(colours.reshape(-1, 3, 1, 1)).exp().sum().item()
    assert abs(total - 1) < 1e-9
    # the mean of the joint is the mean of each channel
    samples = d.sample((20_000,)).view(-1, 3)
    se = samples.std(0) / math.sqrt(20_000)
    assert torch.all((samples.mean(0) - d.mean.view(3)).abs() < 5 * se)


@pytest.mark.parametrize("event_shape", [(1, 8, 8), (3, 5, 4), (1, 28, 28)])
@pytest.mark.parametrize("name", ["discretized-logistic", "logistic-mixture", "categorical"])
def test_level_likelihood_shapes_and_support(event_shape, name):
    torch.manual_seed(12)
    likelihood = build_likelihood(name, event_shape, components=4)
    params = torch.randn(2, 5, *likelihood.params_shape)  # (k, B, *params): IWAE's sample dims
    px = likelihood(params)
    assert px.batch_shape == (2, 5) and px.event_shape == event_shape
    x = px.sample()[0]  # (5, *event)
    assert likelihood.check_support(x) is None
    assert px.log_prob(x).shape == (2, 5) and bool((px.log_prob(x) <= 0).all())
    assert px.mean.shape == (2, 5, *event_shape)
    assert bool(((px.mean >= 0) & (px.mean <= 1)).all())
    assert "8-bit levels" in likelihood.check_support(x + 0.5 / 255)


def test_logistic_mixture_needs_images_and_unknown_likelihoods_list_choices():
    with pytest.raises(ValueError, match="images"):
        build_likelihood("logistic-mixture", (10,))
    with pytest.raises(ValueError, match="discretized-logistic, logistic-mixture, categorical"):
        build_likelihood("poisson", (3,))


def test_mixture_draws_from_noise_follow_the_mixture():
    from vaekit.distributions import draw_from_noise

    torch.manual_seed(14)
    logits, loc = torch.tensor([1.0, -0.5, 0.3]), torch.tensor([[-4.0, 0.0], [0.0, 5.0],
                                                                 [6.0, -3.0]])
    mixture = DiagonalGaussianMixture(logits, loc, torch.full((3, 2), 0.5))
    n = 60_000
    z = draw_from_noise(mixture, torch.randn(n, 2), torch.randn(n))  # (n, 2)
    nearest = torch.cdist(z, loc).argmin(-1)  # components are far apart: the nearest mean
    counts = torch.bincount(nearest, minlength=3).double() / n
    weights = torch.softmax(logits, 0).double()
    assert torch.all((counts - weights).abs() < 5 * (weights * (1 - weights) / n).sqrt())
    with pytest.raises(ValueError, match="choice"):
        draw_from_noise(mixture, torch.randn(3, 2))


# --- posterior families answer for themselves --------------------------------------------------


def test_posterior_families_draw_and_give_codes_and_score_terms_of_their_own():
    torch.manual_seed(3)
    params = torch.randn(4, 6)  # (B, 2 D) encoder outputs, D = 3
    eps = torch.randn(5, 4, 3)
    gaussian = GaussianPosterior(3)(params)
    squashed = SigmoidGaussianPosterior(3)(params)
    normal = gaussian.base_dist
    assert torch.equal(gaussian.draw(eps), normal.loc + normal.scale * eps)
    assert torch.equal(squashed.draw(eps), torch.sigmoid(normal.loc + normal.scale * eps))
    assert torch.equal(gaussian.point_code(), gaussian.mean)
    assert torch.equal(squashed.point_code(), torch.sigmoid(normal.loc))
    prior = StandardNormalPrior(3)()
    mixture = MixturePrior(3, 2)()
    assert gaussian.factorises_against(prior) and not gaussian.factorises_against(mixture)
    assert squashed.factorises_against(UniformPrior(3)())
    # the score-function term: log q at fixed draws, its gradient only through q's parameters
    params.requires_grad_(True)
    for family in (GaussianPosterior(3), SigmoidGaussianPosterior(3)):
        q = family(params)
        score = q.score_log_prob(eps)  # (S, B)
        z = q.draw(eps).detach()
        gaussian_part = normal.log_prob(torch.logit(z) if family.name == "sigmoid-gaussian"
                                        else z).sum(-1)
        assert torch.allclose(score, gaussian_part, atol=1e-3)
        assert torch.autograd.grad(score.sum(), params)[0].abs().sum() > 0


def test_the_posterior_family_is_chosen_by_name_and_checked_against_the_prior():
    assert type(build_posterior("auto", 3, "normal")) is GaussianPosterior
    assert type(build_posterior("auto", 3, "uniform")) is SigmoidGaussianPosterior
    assert type(build_posterior("sigmoid-gaussian", 3, "uniform")) is SigmoidGaussianPosterior
    with pytest.raises(ValueError, match="cannot be paired with --prior uniform: valid pairs "
                                         "are --prior normal with --posterior gaussian or "
                                         "full-covariance or iaf"):
        build_posterior("gaussian", 3, "uniform")
    with pytest.raises(ValueError, match="cannot be paired with --prior vamp"):
        build_posterior("iaf", 3, "vamp")
    with pytest.raises(ValueError, match="unknown posterior 'planar': choose one of auto, "
                                         "gaussian"):
        build_posterior("planar", 3, "normal")
