"""latent.py: the one interface to a model's latent groups, checked on the single-latent VAE
(it must be today's arithmetic, bit for bit) and on families that do or do not factorise."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    SigmoidTransform,
    TransformedDistribution,
)
from torch.distributions.transforms import SoftmaxTransform

from vaekit.distributions import (
    factorised,
    factorises_against,
    kl_or_estimate,
    kl_per_dimension,
    reparameterize,
)
from vaekit.latent import LatentDraw, LatentGroup, split_noise
from vaekit.model import ModelConfig, build_vae


def test_split_noise_gives_one_view_per_group_and_the_tensor_itself_for_one_group():
    eps = torch.randn(4, 3, 7)
    assert split_noise(eps, [7])[0] is eps
    top, bottom = split_noise(eps, [2, 5])
    assert torch.equal(torch.cat([top, bottom], -1), eps) and bottom.shape == (4, 3, 5)


@pytest.mark.parametrize("prior", ["normal", "uniform", "mixture", "vamp"])
def test_the_single_latent_vae_draws_and_scores_exactly_as_its_distributions(prior):
    torch.manual_seed(0)
    model = build_vae(ModelConfig(data_shape=(12,), latent_dim=3, hidden=[8], prior=prior,
                                  prior_components=4))
    x = torch.rand(5, 12).round()
    eps = torch.randn(6, 5, 3)
    with torch.no_grad():
        q, p = model.encode(x), model.prior
        draw = model.infer(x).draw(eps)
        z = reparameterize(q, eps)
        assert model.latent_groups == (("z", 3),) and model.code_dim == 3
        assert torch.equal(draw.z, z) and torch.equal(draw.code, z)
        assert torch.equal(draw.log_ratio(), q.log_prob(z) - p.log_prob(z))
        assert torch.equal(draw.kl(), kl_or_estimate(q, p, z))
        per_dim = draw.log_ratio_per_dimension()
        if prior in ("normal", "uniform"):  # factorised: the per-dimension terms sum to the whole
            assert draw.factorises
            assert torch.allclose(per_dim.sum(-1), draw.log_ratio(), atol=1e-4)
            assert torch.equal(draw.kl_per_dimension(), kl_per_dimension(q, p, z))
        else:  # a mixture over all dimensions at once has no per-dimension terms
            assert not draw.factorises and per_dim is None


def test_families_that_mix_dimensions_do_not_factorise():
    loc = torch.zeros(4, 3)
    diagonal = Independent(Normal(loc, torch.ones(4, 3)), 1)
    full = MultivariateNormal(loc, scale_tril=torch.eye(3))
    assert factorised(diagonal) and factorises_against(diagonal, diagonal)
    assert not factorised(full) and not factorises_against(full, diagonal)
    # a transform of the whole vector (event_dim 1, like a flow's step) is not elementwise
    mixing = TransformedDistribution(Independent(Normal(torch.zeros(3), torch.ones(3)), 1),
                                     [SoftmaxTransform()])
    squashed = TransformedDistribution(diagonal, [SigmoidTransform()])
    assert factorised(squashed)
    assert not factorised(mixing)


def test_a_draw_sums_its_groups_and_places_them_side_by_side():
    torch.manual_seed(1)
    groups = []
    for name, dims in (("top", 2), ("bottom", 3)):
        q = Independent(Normal(torch.randn(4, dims), torch.rand(4, dims) + 0.5), 1)
        p = Independent(Normal(torch.zeros(dims), torch.ones(dims)), 1)
        eps = torch.randn(4, dims)
        groups.append(LatentGroup(name, reparameterize(q, eps), eps, q, p))
    draw = LatentDraw(groups, code=groups[1].z)
    assert torch.allclose(draw.kl(), groups[0].kl() + groups[1].kl())
    assert torch.allclose(draw.log_ratio(), groups[0].log_ratio() + groups[1].log_ratio())
    assert draw.z.shape == (4, 5) and draw.kl_per_dimension().shape == (4, 5)
    assert torch.allclose(draw.kl_per_dimension().sum(-1), draw.kl(), atol=1e-5)


def test_a_prior_given_as_a_function_is_made_once_when_first_needed():
    made = []

    def prior():
        made.append(1)
        return Independent(Normal(torch.zeros(2), torch.ones(2)), 1)

    q = Independent(Normal(torch.zeros(3, 2), torch.ones(3, 2)), 1)
    group = LatentGroup("z", torch.zeros(3, 2), torch.zeros(3, 2), q, prior)
    assert made == []
    group.kl()
    group.log_ratio()
    assert made == [1]
