"""The richer posterior families: full covariance and the inverse autoregressive flow.

Checked against exact answers: torch's own Gaussian KL, the change-of-variables formula with the
Jacobian computed by autograd, and the linear-Gaussian oracle, whose true posterior is known.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vaekit import oracle
from vaekit.distributions import StandardNormalPrior, factorised, kl_or_estimate
from vaekit.model import ModelConfig, build_vae
from vaekit.objectives import elbo_terms, log_importance_weights
from vaekit.posteriors import (
    MADE,
    DiagonalGaussian,
    FullCovariancePosterior,
    IAFPosterior,
    build_posterior,
)


def _randomise_flow(posterior: IAFPosterior, std: float = 0.3, seed: int = 0) -> None:
    """Give every MADE's output layer non-zero weights (an untrained flow is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for made in posterior.made:
            made.out.weight.copy_(std * torch.randn(made.out.weight.shape, generator=generator))
            made.out.bias.copy_(std * torch.randn(made.out.bias.shape, generator=generator))


def test_full_covariance_kl_against_the_normal_prior_is_torchs_gaussian_kl():
    family = FullCovariancePosterior(5)
    q = family(torch.randn(4, family.params_per_example, dtype=torch.float64))
    prior = StandardNormalPrior(5)()
    reference = kl_divergence(MultivariateNormal(q.loc, scale_tril=q.scale_tril),
                              MultivariateNormal(torch.zeros(5, dtype=torch.float64),
                                                 torch.eye(5, dtype=torch.float64)))
    assert torch.allclose(kl_divergence(q, prior), reference, atol=1e-10)
    # against a diagonal Gaussian prior with its own mean and scale too
    loc, scale = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    diagonal = torch.distributions.Independent(Normal(loc, scale), 1)
    reference = kl_divergence(MultivariateNormal(q.loc, scale_tril=q.scale_tril),
                              MultivariateNormal(loc, torch.diag(scale.square())))
    assert torch.allclose(kl_divergence(q, diagonal), reference, atol=1e-10)


def test_full_covariance_draws_have_the_stated_covariance_and_density():
    family = FullCovariancePosterior(3)
    q = family(torch.randn(2, family.params_per_example, dtype=torch.float64))
    eps = torch.randn(20000, 2, 3, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    z = q.draw(eps)  # (S, 2, 3)
    centred = z - q.loc
    covariance = torch.einsum("sbi,sbj->bij", centred, centred) / len(z)
    # the sample covariance's standard error is about sqrt(2 / S) * var: 0.01 of it
    assert torch.allclose(covariance, q.covariance_matrix, atol=5 * math.sqrt(2 / len(z))
                          * float(q.covariance_matrix.abs().max()))
    assert torch.allclose(q.marginal_scale(), q.covariance_matrix.diagonal(dim1=-2,
                                                                          dim2=-1).sqrt())
    reference = MultivariateNormal(q.loc, scale_tril=q.scale_tril)
    assert torch.allclose(q.log_prob(z[:5]), reference.log_prob(z[:5]))
    assert not factorised(q) and not q.factorises_against(StandardNormalPrior(3)())


def test_an_untrained_iaf_is_the_diagonal_gaussian_exactly():
    torch.manual_seed(0)
    family = IAFPosterior(4, flow_steps=3)
    params = torch.randn(6, family.params_per_example)
    q = family(params)
    gaussian = DiagonalGaussian(params[:, :4], torch.nn.functional.softplus(params[:, 4:8]))
    eps = torch.randn(7, 6, 4)
    z = q.draw(eps)
    assert torch.equal(z, gaussian.draw(eps))
    assert torch.equal(q.log_prob(z), gaussian.log_prob(z))
    # and so through a whole model: an untrained IAF model's ELBO is the Gaussian model's
    shape = (12,)
    gaussian_model, iaf_model = (build_vae(ModelConfig(data_shape=shape, latent_dim=4,
                                                       hidden=[16], posterior=name))
                                 for name in ("gaussian", "iaf"))
    iaf_parameters = dict(iaf_model.named_parameters())
    with torch.no_grad():
        for name, parameter in gaussian_model.named_parameters():
            # the same weights; the IAF encoder's last layer also gives the context (more rows)
            iaf_parameters[name][:len(parameter)] = parameter
    x = torch.rand(5, *shape).round()
    eps = torch.randn(3, 5, 4)
    # the same draws, so the same log p(x | z) and log q(z | x) - log p(z): the same importance
    # weights (the ELBO's KL differs only in being closed form for the Gaussian alone)
    for gaussian_term, iaf_term in zip(log_importance_weights(gaussian_model, x, eps),
                                       log_importance_weights(iaf_model, x, eps)):
        assert torch.allclose(gaussian_term, iaf_term, atol=1e-6)
    assert torch.equal(elbo_terms(gaussian_model, x, eps[0]).reconstruction,
                       elbo_terms(iaf_model, x, eps[0]).reconstruction)


def test_iaf_log_prob_is_the_change_of_variables_with_autograds_jacobian():
    torch.manual_seed(1)
    family = IAFPosterior(3, flow_steps=2).double()
    _randomise_flow(family)
    params = torch.randn(1, family.params_per_example, dtype=torch.float64)
    eps = torch.randn(3, dtype=torch.float64)

    def flow(noise):
        return family(params).draw(noise.view(1, 3)).view(3)

    jacobian = torch.autograd.functional.jacobian(flow, eps)  # (3, 3) dz / d eps
    expected = Normal(0.0, 1.0).log_prob(eps).sum() - torch.logdet(jacobian)
    q = family(params)
    z = q.draw(eps.view(1, 3))
    assert torch.allclose(q.log_prob(z), expected.view(1), atol=1e-10)
    # at a z it did not draw, the flow is inverted (D passes per step): the same density
    assert torch.allclose(q.log_prob(z.clone()), expected.view(1), atol=1e-8)


def test_a_made_step_is_autoregressive_in_its_order():
    torch.manual_seed(2)
    for order in (torch.arange(5), torch.arange(5).flip(0)):
        made = MADE(5, 32, order).double()
        with torch.no_grad():
            made.out.weight.normal_()
        context = torch.randn(1, 32, dtype=torch.float64)
        z = torch.randn(5, dtype=torch.float64)
        for output in (0, 1):  # shift and log-scale
            jacobian = torch.autograd.functional.jacobian(
                lambda v: made(v.view(1, 5), context)[output].view(5), z)  # (5, 5)
            rank = torch.empty(5, dtype=torch.long)
            rank[order] = torch.arange(5)
            allowed = rank[:, None] > rank[None, :]  # output d sees coordinates before it
            assert bool((jacobian[~allowed] == 0).all())
            assert bool((jacobian[allowed] != 0).any())


def test_iaf_kl_is_estimated_at_the_draw_and_unbiased():
    torch.manual_seed(3)
    family = IAFPosterior(2, flow_steps=2).double()
    _randomise_flow(family, std=0.3)
    q = family(torch.randn(1, family.params_per_example, dtype=torch.float64))
    prior = StandardNormalPrior(2)().expand(torch.Size([1]))
    eps = torch.randn(40000, 1, 2, generator=torch.Generator().manual_seed(4),
                      dtype=torch.float64)
    z = q.draw(eps)
    estimates = kl_or_estimate(q, prior, z)  # (S, 1): no closed form, the log-ratio at z
    assert estimates.shape == (40000, 1)
    # the KL by quadrature on a grid, in 2-d: the exact value the estimate's mean must reach
    grid = torch.linspace(-9, 9, 451, dtype=torch.float64)
    points = torch.cartesian_prod(grid, grid).view(-1, 1, 2)
    log_q = q.log_prob(points.clone())  # (G, 1) by inverting the flow
    cell = float(grid[1] - grid[0]) ** 2
    log_q = log_q.detach()
    density = log_q.exp()
    exact = float((density * (log_q - prior.log_prob(points))).sum().detach() * cell)
    assert abs(float(density.sum() * cell) - 1) < 1e-3  # the density integrates to one
    standard_error = float(estimates.detach().std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.detach().mean()) - exact) < 4 * standard_error + 1e-3


def test_full_covariance_q_at_the_exact_posterior_gives_log_px_at_every_draw():
    model = oracle.linear_gaussian_vae(8, 3, 0.5, orthogonal=False, posterior="full-covariance")
    x = oracle.sample_data(model, 64)
    exact = oracle.exact_log_px(model, x)  # (B,)
    eps = torch.randn(10, 64, 3)
    log_px_z, log_ratio = log_importance_weights(model, x, eps)  # (S, B) each
    log_weight = log_px_z - log_ratio  # log p(x, z) - log q(z | x) at each draw
    # q is the posterior, so every importance weight is p(x) itself: no spread over draws
    assert torch.allclose(log_weight.double(), exact.expand(10, -1).float().double(),
                          atol=2e-3, rtol=1e-5)
    assert torch.allclose(oracle.exact_elbo(model, x).elbo, exact, atol=1e-3)
    assert oracle.best_diagonal_gap(model) > 0.2  # a posterior a diagonal q cannot match


def test_full_covariance_closes_the_gap_a_diagonal_posterior_cannot():
    """The note's points 13-14 on an exact answer: fitted to the same data and decoder, the
    diagonal q's gap stops at the least any diagonal Gaussian can reach (> 0), the
    full-covariance q's gap vanishes."""
    gaps = oracle.posterior_gaps()
    assert gaps["diagonal bound"] > 0.2
    assert gaps["gaussian"] >= gaps["diagonal bound"] - 1e-6  # no diagonal q does better
    assert gaps["gaussian"] < gaps["diagonal bound"] + 1e-3  # and the fit reached that bound
    assert gaps["full-covariance"] < 1e-4  # the gap vanishes


def test_every_iaf_output_depends_on_the_context_even_the_first_in_its_order():
    torch.manual_seed(10)
    made = MADE(3, 16, torch.arange(3)).double()
    with torch.no_grad():
        made.context_out.weight.normal_()
    z = torch.randn(1, 3, dtype=torch.float64)
    context = torch.randn(1, 16, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(
        lambda h: made(z, h.view(1, 16))[0].view(3), context.view(16))  # (3, 16)
    assert bool((jacobian.abs().sum(1) > 0).all())


def test_a_float64_full_covariance_model_takes_float32_noise():
    model = build_vae(ModelConfig(data_shape=(5,), latent_dim=3, hidden=[8],
                                  posterior="full-covariance")).double()
    x = torch.rand(4, 5, dtype=torch.float64).round()
    assert elbo_terms(model, x).elbo.dtype == torch.float64  # eps drawn in float32 inside


def test_flow_steps_without_the_iaf_posterior_are_refused():
    from vaekit.config import TrainConfig
    from vaekit.errors import ConfigError

    with pytest.raises(ConfigError, match="--flow-steps sets the steps of --posterior iaf"):
        TrainConfig(flow_steps=3).validate()
    assert TrainConfig(posterior="iaf", flow_steps=3).validate().flow_steps == 3


def test_posterior_families_by_name_with_flow_steps():
    assert build_posterior("iaf", 4, "normal", flow_steps=5).steps == 5
    assert build_posterior("iaf", 4, "mixture").steps == IAFPosterior.default_steps
    assert isinstance(build_posterior("full-covariance", 4, "normal"), FullCovariancePosterior)
    with pytest.raises(ValueError, match="cannot be paired with --prior uniform"):
        build_posterior("full-covariance", 4, "uniform")
