"""The linear-Gaussian oracles (one latent group, and the two-group hierarchy), checked against
numerical integration and Bayes' rule; the hierarchy through the flat VAE's estimators."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from vaekit.data import Pipeline
from vaekit.estimate import evaluate, log_mean_exp, log_weights
from vaekit.model import ModelConfig, build_vae
from vaekit.objectives import elbo_terms, iwae_terms
from vaekit.oracle import (
    LinearGaussianHierarchy,
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


# ------------------------------------------------------------------------------------------------
# Two latent groups: z2 -> z1 -> x, through the same objectives and estimators as the flat VAE

HIERARCHY = Pipeline("identity", "real", 0, description="hierarchy oracle data (model space)")


@pytest.fixture(scope="module")
def hierarchy():
    """A 10-d linear-Gaussian hierarchy with groups of 2 (top) and 3 (bottom), 60 examples."""
    model = LinearGaussianHierarchy(10, 2, 3, 0.5, seed=4)
    x = sample_data(model, 60, seed=5).float()  # the estimators see float32 data
    return model, x, model.exact_log_px(x)


def test_hierarchy_marginal_and_posterior_satisfy_bayes_rule(hierarchy):
    """log p(x) = log p(x|z1) + log p(z1|z2) + log p(z2) - log p(z2, z1 | x) at any (z2, z1):
    true only if the exact marginal and the exact joint posterior are both right."""
    model, x, exact = hierarchy
    u = torch.randn(7, len(x), 5, dtype=torch.float64)  # (S, B, D) arbitrary codes, z2 then z1
    z2, z1 = u[..., :2], u[..., 2:]
    with torch.no_grad():
        log_joint = model.decode(z1).log_prob(x.double()) + model.bottom_prior(z2).log_prob(z1) \
            + model.top_prior().log_prob(z2)  # (S, B)
        posterior = model.exact_posterior(x).log_prob(u)  # (S, B)
    assert torch.allclose(log_joint - posterior, exact.expand(7, -1), atol=1e-8)
    # the marginal's moments are those of data drawn ancestrally
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        drawn = model.sample(40000)  # (N, D_x)
    marginal = model.exact_marginal()
    se = marginal.variance.sqrt() / math.sqrt(len(drawn))
    assert float(((drawn.mean(0) - marginal.mean) / se).abs().max()) < 4.5


def test_hierarchy_posterior_is_the_exact_posterior_factorised_top_down(hierarchy):
    model, x, _ = hierarchy
    eps = torch.randn(5, len(x), 5, dtype=torch.float64)
    with torch.no_grad():
        draw = model.infer(x).draw(eps)  # one draw of both groups per sample
        top, bottom = draw.groups
        log_q = top.q.log_prob(top.z) + bottom.q.log_prob(bottom.z)  # (S, B)
        assert torch.equal(draw.code, bottom.z) and draw.z.shape == (5, len(x), 5)
        exact = model.exact_posterior(x).log_prob(draw.z)  # (S, B)
    assert torch.allclose(log_q, exact, atol=1e-8)


def test_hierarchy_elbo_and_importance_weights_equal_log_px_with_the_exact_posterior(hierarchy):
    """The ELBO (reconstruction minus the sum of the two groups' closed-form KLs) averages to
    log p(x), and every importance weight is p(x) itself: the estimators' code is the flat
    VAE's, reached through the latent interface."""
    model, x, exact = hierarchy
    with torch.no_grad():
        # one closed-form KL per group: KL(q(z2|x) || p(z2)) and KL(q(z1|x,z2) || p(z1|z2))
        draw = model.infer(x).draw(torch.randn(len(x), 5))
        assert all(group.exact_kl_per_dimension() is None for group in draw.groups)
        assert torch.allclose(draw.kl(), sum(kl_divergence(g.q, g.p) for g in draw.groups))
        elbos = torch.stack([elbo_terms(model, x).elbo for _ in range(3000)])  # (n, B)
        bound = iwae_terms(model, x, torch.randn(len(x), 4, 5)).bound  # (B,)
    se = elbos.std(0) / math.sqrt(len(elbos))
    assert float(((elbos.mean(0) - exact) / se).abs().max()) < 4.5
    assert float(elbos.std(0).min()) > 0.01  # the closed-form KLs make each draw's ELBO vary
    assert torch.allclose(bound, exact, atol=1e-8)
    log_w = log_weights(model, x, 0, 300)  # (k, B) the flat VAE's importance sampler
    assert torch.allclose(log_w, exact.expand(300, -1), atol=1e-8)
    summary = evaluate(model, x, HIERARCHY, k=50, naive=False).summary()
    assert summary["elbo"] == pytest.approx(float(exact.mean()), abs=1e-8)
    assert summary["elbo_gap"] == pytest.approx(0.0, abs=1e-8)
    assert summary["latent_dim"] == 5 and not summary["kl_exact"]


def widened_hierarchy() -> LinearGaussianHierarchy:
    """The fixture's model with posteriors too wide and a little off: log p(x) as it was, q not
    the posterior."""
    wide = LinearGaussianHierarchy(10, 2, 3, 0.5, seed=4)
    with torch.no_grad():
        wide.top_scale_tril.mul_(1.25)
        wide.bottom_scale_tril.mul_(1.25)
        wide.bottom_bias.add_(0.02)
    return wide


def test_hierarchy_importance_sampling_converges_to_the_exact_log_likelihood(hierarchy):
    """With a posterior that is too wide, the ELBO falls below log p(x), and vaekit's
    importance-sampling evaluation (the same code as for the flat VAE) lands within a few
    standard errors of the exact value; the gap is KL(q || p(z|x)) > 0."""
    model, x, exact = hierarchy
    wide = widened_hierarchy()
    result = evaluate(wide, x, HIERARCHY, k=1000).summary()
    assert abs(result["log_px"] - float(exact.mean())) < 4 * result["log_px_se"]
    assert result["elbo"] < result["log_px"] - 10 * result["elbo_gap_se"]
    assert result["elbo_gap"] > 0.1
    assert result["kl"] > 0 and result["log_px_ess"] > 100
    # the naive estimator draws codes from the prior, ancestrally, and is far noisier
    assert result["log_px_naive"] < result["log_px"]


def test_hierarchy_importance_sampling_at_k_5000_is_within_005_nats(hierarchy):
    """The hierarchical-VAE issue's bar: with an imperfect top-down q, vaekit's importance
    sampling at k = 5000 lands within 0.05 nats of the exact log p(x), example by example."""
    model, x, exact = hierarchy
    wide = widened_hierarchy()
    per_example = evaluate(wide, x, HIERARCHY, k=5000, naive=False).per_example["log_px"]
    assert float((per_example - exact).abs().max()) < 0.05
    assert abs(float(per_example.mean() - exact.mean())) < 0.01


def test_hierarchy_prior_draws_are_ancestral_draws_of_the_exact_prior(hierarchy):
    """The naive estimator, whose codes come from the model's prior_draws (z2, then z1 given z2),
    converges to the exact log p(x) too: the prior the estimators see is the model's."""
    model, x, exact = hierarchy
    sums = log_mean_exp(log_weights(model, x[:8], 0, 40000, proposal="prior"))
    error = sums.estimate - exact[:8]  # (8,)
    se = sums.variance.sqrt()
    assert float((error.abs() / se).max()) < 4.5
    assert float(sums.effective_sample_size.min()) > 5  # few prior draws land where x was made


def test_the_bound_that_skips_the_bottom_group_matches_its_closed_form(hierarchy):
    """Havtorn et al.'s L^{>1}: z2 from q, z1 from p(z1 | z2). On the linear-Gaussian hierarchy
    it has a closed form; vaekit's estimator (the mean of one-draw bounds) lands within 4 s.e.
    of it on every example, its ELBO column is log p(x) with the exact posterior, and the bound
    lies below the ELBO (skipping the bottom group forgets what z1 knew of x)."""
    from vaekit.estimate import skip_bounds_per_example

    model, x, exact = hierarchy
    for q in (model, widened_hierarchy()):
        samples = 4000
        bounds = skip_bounds_per_example(q, x, HIERARCHY, samples, seed=3)  # (B, 2)
        closed = q.exact_skip_bound(x)  # (B,)
        # the spread of one-draw L^{>1} values gives the estimator's standard error
        with torch.no_grad():
            draws = torch.stack([
                (lambda d: q.decode(d.code).log_prob(x.double()) - d.kl())(
                    q.infer(x).draw(torch.randn(len(x), 5, dtype=torch.float64),
                                    inferred_groups=1)) for _ in range(400)])  # (400, B)
        se = draws.std(0) / math.sqrt(samples)
        assert float(((bounds[:, 1] - closed) / se).abs().max()) < 4.5
        assert float((closed - exact).max()) < -1.0  # far below log p(x) on every example
    exact_q = skip_bounds_per_example(model, x, HIERARCHY, 2000, seed=3)
    with torch.no_grad():
        one_draw = torch.stack([elbo_terms(model, x).elbo for _ in range(400)])  # (400, B)
    se = one_draw.std(0) / math.sqrt(2000)
    assert float(((exact_q[:, 0] - exact) / se).abs().max()) < 4.5
