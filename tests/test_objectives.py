"""The ELBO: its two terms, computed by hand, and the gradient the reparameterisation gives."""

from __future__ import annotations

import math

import pytest
import torch

from vaekit.model import ModelConfig, build_vae
from vaekit.config import TrainConfig
from vaekit.objectives import (
    FreeBitsObjective,
    IWAEObjective,
    KLSchedule,
    Objective,
    build_objective,
    elbo_terms,
    free_bits_kl,
    iwae_terms,
    kl_groups,
    log_importance_weights,
)


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


# ------------------------------------------------------------------------------------------------
# The importance-weighted bound


def _ppca(seed: int = 4, data_dim: int = 4, latent_dim: int = 2, sigma: float = 0.5):
    """A linear-Gaussian VAE with known log p(x) and a deliberately imperfect encoder."""
    torch.manual_seed(seed)
    model = build_vae(ModelConfig(data_shape=(data_dim,), latent_dim=latent_dim, hidden=[],
                                  likelihood="gaussian", gaussian_scale=sigma))
    w = torch.randn(data_dim, latent_dim)
    b = torch.randn(data_dim)
    decoder = model.decoder.net[0]
    decoder.weight.data, decoder.bias.data = w.clone(), b.clone()
    exact = torch.distributions.MultivariateNormal(b, w @ w.T + sigma ** 2 * torch.eye(data_dim))
    return model, exact


def test_iwae_bound_is_at_least_the_elbo_of_the_same_samples():
    """log of the mean weight >= mean of the log weights (Jensen), for every draw."""
    model, _ = _ppca()
    x = torch.randn(6, 4) * 2
    for k in (1, 5, 50):
        terms = iwae_terms(model, x, torch.randn(6, k, 2))
        assert terms.bound.shape == (6,)
        assert torch.all(terms.bound >= terms.elbo - 1e-5)
        if k == 1:
            assert torch.allclose(terms.bound, terms.elbo, atol=1e-5)


def test_iwae_bound_tightens_with_k_towards_the_exact_log_likelihood():
    """Burda et al.: ELBO <= IWAE_k <= IWAE_{k'} <= log p(x) for k < k' (pPCA as the oracle)."""
    model, exact = _ppca()
    x = torch.randn(3, 4) * 2
    log_px = exact.log_prob(x)  # (3,)
    n = 2000
    with torch.no_grad():
        elbo = torch.stack([elbo_terms(model, x).elbo for _ in range(n)])  # (n, 3)
        means, errors = [elbo.mean(0)], [elbo.std(0) / math.sqrt(n)]
        for k in (5, 50):
            bounds = torch.stack([iwae_terms(model, x, torch.randn(3, k, 2)).bound
                                  for _ in range(n)])  # (n, 3)
            means.append(bounds.mean(0))
            errors.append(bounds.std(0) / math.sqrt(n))
    for (low, low_se), (high, high_se) in zip(zip(means, errors), zip(means[1:], errors[1:])):
        assert torch.all(high - low > 4 * (low_se ** 2 + high_se ** 2).sqrt()), (low, high)
    assert torch.all(means[-1] <= log_px + 4 * errors[-1])
    assert torch.all(log_px - means[0] > 1.0)  # the encoder is far from the true posterior


def test_iwae_bound_is_exact_with_the_true_posterior_and_differentiable():
    model, exact = _ppca(seed=5, latent_dim=1)
    # pPCA posterior for one latent dimension: variance s^2 / (|w|^2 + s^2)
    w, b = model.decoder.net[0].weight.data[:, 0], model.decoder.net[0].bias.data
    sigma2 = 0.25
    post_var = sigma2 / (w @ w + sigma2)
    encoder = model.encoder.net[0]
    encoder.weight.data = torch.stack([post_var / sigma2 * w, torch.zeros(4)])
    encoder.bias.data = torch.stack([-(post_var / sigma2) * (w @ b),
                                     torch.log(torch.expm1(post_var.sqrt()))])
    x = torch.randn(5, 4)
    terms = iwae_terms(model, x, torch.randn(5, 7, 1))
    assert torch.allclose(terms.bound, exact.log_prob(x), atol=1e-4)
    terms.bound.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_log_importance_weights_shapes_and_meaning():
    model, _ = _ppca()
    x = torch.randn(3, 4)
    eps = torch.randn(8, 3, 2)
    log_px_z, log_ratio = log_importance_weights(model, x, eps)
    assert log_px_z.shape == log_ratio.shape == (8, 3)
    q = model.encode(x)
    z = q.base_dist.loc + q.base_dist.scale * eps  # (8, 3, 2)
    assert torch.allclose(log_ratio, q.log_prob(z) - model.prior.log_prob(z), atol=1e-5)
    assert torch.allclose(log_px_z, model.decode(z).log_prob(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Free bits and schedules


def test_kl_groups_split_consecutive_dimensions():
    kl = torch.arange(10.0).view(2, 5)
    assert torch.equal(kl_groups(kl, 1), kl)
    assert torch.equal(kl_groups(kl, 2), torch.tensor([[1.0, 5.0, 4.0], [11.0, 15.0, 9.0]]))
    assert torch.equal(kl_groups(kl, 9), kl.sum(-1, keepdim=True))


def test_free_bits_floor_value_and_gradient():
    groups = torch.tensor([[0.1, 2.0, 0.4], [0.3, 3.0, 0.9]], requires_grad=True)  # (B, G)
    floor = 0.5
    penalty = free_bits_kl(groups, floor)  # (B,)
    # batch means per group: 0.2 (under), 2.5 (over), 0.65 (over)
    assert abs(penalty.mean().item() - (0.5 + 2.5 + 0.65)) < 1e-6
    penalty.mean().backward()
    # groups under the floor get no gradient; the others that of their batch mean
    assert torch.equal(groups.grad, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]))
    # the global batch's means decide when given (here they put group 2 under the floor too)
    penalty = free_bits_kl(groups.detach(), floor, group_means=torch.tensor([0.2, 2.5, 0.4]))
    assert torch.allclose(penalty, torch.tensor([0.5 + 2.0 + 0.5, 0.5 + 3.0 + 0.5]))


def test_free_bits_never_lowers_the_penalty_below_the_floor():
    torch.manual_seed(0)
    groups = torch.rand(16, 6) * 2  # (B, G)
    for floor in (0.1, 0.5, 1.0, 3.0):
        value = free_bits_kl(groups, floor).mean()
        expected = torch.clamp(groups.mean(0), min=floor).sum()
        assert abs(value.item() - expected.item()) < 1e-5
        assert value.item() >= groups.shape[1] * floor - 1e-5


def test_kl_schedules_give_the_documented_betas():
    constant = KLSchedule("constant", beta=4.0)
    assert [constant(t) for t in (0, 3.5, 100)] == [4.0, 4.0, 4.0]
    linear = KLSchedule("linear", beta=2.0, warmup_epochs=4)
    assert [linear(t) for t in (0, 1, 2, 4, 10)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    cyclical = KLSchedule("cyclical", beta=1.0, cycle_epochs=4, cycle_ratio=0.5)
    # each 4-epoch cycle: 0 -> 1 over its first 2 epochs, then 1; then starts again from 0
    assert [cyclical(t) for t in (0, 1, 2, 3, 3.99, 4, 5, 9)] == \
        [0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="constant, linear, cyclical"):
        KLSchedule("exponential")


def test_conditional_elbo_depends_on_the_label():
    torch.manual_seed(6)
    model = build_vae(ModelConfig(data_shape=(5,), latent_dim=2, hidden=[7],
                                  likelihood="bernoulli", num_classes=3))
    x = torch.bernoulli(torch.full((4, 5), 0.4))
    eps = torch.randn(4, 2)
    a = elbo_terms(model, x, eps, torch.tensor([0, 0, 0, 0]))
    b = elbo_terms(model, x, eps, torch.tensor([2, 2, 2, 2]))
    assert a.elbo.shape == (4,) and not torch.allclose(a.elbo, b.elbo)
    bound = iwae_terms(model, x, torch.randn(4, 3, 2), torch.tensor([0, 1, 2, 1])).bound
    assert bound.shape == (4,)
    with pytest.raises(ValueError, match="conditional"):
        elbo_terms(model, x, eps)


# ------------------------------------------------------------------------------------------------
# Objective objects: what training asks of an objective


def test_build_objective_gives_one_object_per_objective_with_its_noise_and_columns():
    plain = build_objective(TrainConfig(beta=2.0, kl_schedule="linear", kl_warmup_epochs=4.0))
    assert type(plain) is Objective and plain.noise_shape(6) == (6,) and plain.log_columns == ()
    assert plain.beta(1.0) == pytest.approx(0.5) and plain.beta(8.0) == 2.0
    assert plain.describe() == "beta-ELBO, beta = 2, linear KL schedule"
    free = build_objective(TrainConfig(free_bits=0.5, free_bits_group_size=2))
    assert isinstance(free, FreeBitsObjective) and free.log_columns == ("kl_groups_at_floor",)
    assert free.describe() == "ELBO, free bits 0.5 nats per 2 dimension(s)"
    iwae = build_objective(TrainConfig(objective="iwae", iwae_samples=7))
    assert isinstance(iwae, IWAEObjective) and iwae.noise_shape(6) == (7, 6)
    assert iwae.describe() == "IWAE bound, k = 7" and iwae.epoch_record({}, {}) == {}


def test_objective_objects_compute_the_documented_per_example_objectives():
    torch.manual_seed(0)
    model = build_vae(ModelConfig(data_shape=(10,), latent_dim=4, hidden=[8]))
    x = torch.rand(6, 10).round()
    eps = torch.randn(6, 4)

    def mean(t):  # one process: the global mean is the mean
        return t

    terms = Objective().terms(model, x, None, eps)
    reference = elbo_terms(model, x, eps)
    assert torch.equal(terms[0], reference.reconstruction) and terms[2] is None
    value, logged = Objective(KLSchedule(beta=3.0)).per_example(terms, 3.0, mean)
    assert torch.equal(value, reference.weighted(3.0)) and logged == {}
    free = FreeBitsObjective(KLSchedule(), floor=0.2, group_size=1)
    terms = free.terms(model, x, None, eps)
    value, logged = free.per_example(terms, 1.0, mean)
    groups = elbo_terms(model, x, eps, per_dimension=True).kl_dimensions  # (B, D)
    assert torch.allclose(value, reference.reconstruction - free_bits_kl(groups, 0.2))
    assert float(logged["kl_groups_at_floor"]) == float((groups.mean(0) <= 0.2).sum())
    iwae = IWAEObjective(3)
    eps_k = torch.randn(6, 3, 4)
    value, _ = iwae.per_example(iwae.terms(model, x, None, eps_k), 1.0, mean)
    assert torch.equal(value, iwae_terms(model, x, eps_k).bound)
