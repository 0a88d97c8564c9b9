"""What the latent-space tools ask of distributions.py: ranges, coordinates, the inner Gaussian."""

from __future__ import annotations

import math

import pytest
import torch

from vaekit.distributions import (
    StandardNormalPrior,
    UniformPrior,
    base_normal,
    per_dimension,
    reparameterize,
)
from vaekit.posteriors import GaussianPosterior, SigmoidGaussianPosterior


def test_prior_ranges_are_width_standard_deviations_within_the_support():
    assert StandardNormalPrior(3).range(2.5) == (-2.5, 2.5)
    assert UniformPrior(3).range() == (0.0, 1.0)  # 3 sd = 0.87 > 1/2: the whole cube
    low, high = UniformPrior(3).range(1.0)
    assert high - low == pytest.approx(2 / math.sqrt(12))  # the uniform's sd is 1/sqrt(12)
    assert (low + high) / 2 == pytest.approx(0.5)


def test_interpolation_modes_default_first_and_never_leave_the_cube():
    assert StandardNormalPrior(2).interpolation_modes[0] == "spherical"
    assert UniformPrior(2).interpolation_modes == ("linear",)


@pytest.mark.parametrize("prior", [StandardNormalPrior(4), UniformPrior(4)])
def test_per_dimension_log_probs_sum_to_the_joint(prior):
    p = prior()
    z = p.sample((5,))  # (5, 4)
    coordinates = per_dimension(p)
    assert coordinates.log_prob(z).shape == (5, 4)
    torch.testing.assert_close(coordinates.log_prob(z).sum(-1), p.log_prob(z))


def test_per_dimension_icdf_gives_prior_quantiles():
    normal = per_dimension(StandardNormalPrior(2)())
    uniform = per_dimension(UniformPrior(2)())
    u = torch.tensor([[0.5, 0.975]])
    torch.testing.assert_close(normal.icdf(u), torch.tensor([[0.0, 1.959964]]))
    torch.testing.assert_close(uniform.icdf(u), u)


def test_per_dimension_of_a_squashed_posterior_keeps_exact_log_density():
    torch.manual_seed(0)
    q = SigmoidGaussianPosterior(3)(torch.randn(2, 6))
    eps = torch.randn(7, 2, 3)
    z = reparameterize(q, eps)  # (7, 2, 3), saturates nowhere here
    coordinates = per_dimension(q)
    torch.testing.assert_close(coordinates.log_prob(z).sum(-1), q.log_prob(z))
    # the change of variables by hand: log N(y) + log|dy/dz|, y = logit z
    inner = base_normal(q)
    y = inner.loc + inner.scale * eps
    by_hand = inner.log_prob(y) - torch.log(torch.sigmoid(y) * torch.sigmoid(-y))
    torch.testing.assert_close(coordinates.log_prob(z), by_hand, rtol=1e-4, atol=1e-4)


def test_base_normal_finds_the_gaussian_and_refuses_others():
    params = torch.randn(3, 4)
    for family in (GaussianPosterior(2), SigmoidGaussianPosterior(2)):
        inner = base_normal(family(params))
        torch.testing.assert_close(inner.loc, params[:, :2])
        torch.testing.assert_close(inner.scale, torch.nn.functional.softplus(params[:, 2:]))
    with pytest.raises(TypeError):
        base_normal(UniformPrior(2)())
