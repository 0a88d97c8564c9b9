"""draw_at_temperature: one tempered draw for every prior vaekit has."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from vaekit.distributions import draw_at_temperature
from vaekit.model import ModelConfig, build_vae

N = 40_000


def prior_of(name: str, components: int | None = None):
    with torch.no_grad():  # the learned priors' parameters: plain numbers here
        return build_vae(ModelConfig(data_shape=(1, 8, 8), latent_dim=3, prior=name,
                                     prior_components=components)).prior


def draws(prior, temperature: float, seed: int = 0):
    with torch.no_grad():
        return draw_at_temperature(prior, N, temperature, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_normal_prior_scale_times_temperature(temperature):
    z = draws(prior_of("normal"), temperature)  # (N, 3)
    # the sd of N normal draws has standard error sd / sqrt(2N)
    assert torch.allclose(z.std(0), torch.full((3,), temperature),
                          atol=4 * max(temperature, 1e-9) / math.sqrt(2 * N))
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=4 * temperature / math.sqrt(N) + 1e-12)


def test_uniform_prior_is_the_cube_at_one_and_its_centre_at_zero():
    prior = prior_of("uniform")
    z = draws(prior, 1.0)
    for d in range(3):  # Kolmogorov-Smirnov distance to Uniform(0, 1), 1 % level: 1.63 / sqrt(N)
        ordered = z[:, d].sort().values
        grid = torch.arange(1, N + 1, dtype=ordered.dtype) / N
        assert float((ordered - grid).abs().max()) < 1.63 / math.sqrt(N)
    assert torch.equal(draws(prior, 0.0), torch.full((N, 3), 0.5))
    # T = 0.5: z = Phi(eps / 2), whose sd is known by quadrature
    eps = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    density = Normal(0.0, 1.0).log_prob(eps).exp() * (eps[1] - eps[0])
    values = Normal(0.0, 1.0).cdf(0.5 * eps)
    exact_sd = math.sqrt(float((density * (values - 0.5) ** 2).sum()))
    z = draws(prior, 0.5)
    assert float(z.std(0).max() - exact_sd) < 4 * exact_sd / math.sqrt(2 * N)
    assert float(z.min()) > 0 and float(z.max()) < 1


@pytest.mark.parametrize("name", ["mixture", "vamp"])
def test_mixture_priors_keep_components_and_scale_their_spread(name):
    prior = prior_of(name, components=4)
    normal = prior.component_distribution.base_dist
    loc, scale = normal.loc.detach(), normal.scale.detach()  # (K, D)
    weights = prior.mixture_distribution.probs.detach()  # (K,)
    at_zero = draws(prior, 0.0)
    # T = 0: every draw is one of the component means
    distance = (at_zero[:, None, :] - loc[None]).abs().amax(-1)  # (N, K)
    assert float(distance.min(1).values.max()) < 1e-6
    # T = 1 and 0.5: the mixture's mean is kept; its variance is E_k[T^2 s_k^2] + Var_k(mu_k)
    mean = (weights[:, None] * loc).sum(0)
    for temperature in (1.0, 0.5):
        z = draws(prior, temperature)
        variance = (weights[:, None] * ((temperature * scale) ** 2 + (loc - mean) ** 2)).sum(0)
        sd = variance.sqrt()
        assert torch.allclose(z.mean(0), mean, atol=float(4 * sd.max() / math.sqrt(N)))
        assert torch.allclose(z.var(0), variance, rtol=0.05)


def test_temperature_one_is_the_prior_itself_and_the_seed_fixes_the_draw():
    prior = prior_of("normal")
    assert torch.equal(draws(prior, 1.0, seed=5), draws(prior, 1.0, seed=5))
    model = build_vae(ModelConfig(data_shape=(1, 8, 8), latent_dim=3))
    with torch.no_grad():
        first = model.sample(4, mean=True, temperature=0.7,
                             generator=torch.Generator().manual_seed(1))
        again = model.sample(4, mean=True, temperature=0.7,
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="temperature"):
        draw_at_temperature(prior, 3, -1.0)
