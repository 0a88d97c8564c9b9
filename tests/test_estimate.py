"""Evaluation over a split: labels reach a conditional model, the IWAE bound, bits/dim."""

from __future__ import annotations

import math

import torch

from vaekit.data import Pipeline, load_digits
from vaekit.estimate import bits_per_dim, elbo_per_example, iwae_per_example
from vaekit.model import ModelConfig, build_vae
from vaekit.objectives import elbo_terms, iwae_terms
from vaekit.randomness import fixed_normal


def _conditional_digits():
    torch.manual_seed(0)
    data = load_digits()
    pipeline = Pipeline.build(data, "bernoulli", "dynamic", 0)
    model = build_vae(ModelConfig(data_shape=(1, 8, 8), latent_dim=3, hidden=[16],
                                  num_classes=10))
    return data, pipeline, model


def test_elbo_per_example_passes_each_example_its_label_whatever_the_chunking():
    data, pipeline, model = _conditional_digits()
    raw, labels = data.test_x[:40], data.test_y[:40]
    whole = elbo_per_example(model, raw, pipeline, labels=labels)
    chunked = elbo_per_example(model, raw, pipeline, labels=labels, batch_size=7)
    assert torch.equal(whole, chunked)
    x = pipeline.fixed(raw, 0)
    eps = fixed_normal((3,), 0, 40, (0, "elbo-eps", "test"))
    with torch.no_grad():
        direct = elbo_terms(model, x, eps, labels)
        wrong = elbo_terms(model, x, eps, (labels + 1) % 10)
    assert torch.allclose(whole[:, 0].float(), direct.reconstruction, atol=1e-5)
    assert not torch.allclose(whole[:, 0].float(), wrong.reconstruction, atol=1e-3)


def test_iwae_per_example_is_the_bound_with_fixed_noise_and_above_the_elbo():
    data, pipeline, model = _conditional_digits()
    raw, labels = data.test_x[:30], data.test_y[:30]
    bound = iwae_per_example(model, raw, pipeline, 50, labels=labels)
    assert bound.shape == (30,) and bound.dtype == torch.float64
    eps = fixed_normal((50, 3), 0, 30, (0, "iwae-eps", "test"))
    with torch.no_grad():
        direct = iwae_terms(model, pipeline.fixed(raw, 0), eps, labels).bound
    assert torch.allclose(bound.float(), direct, atol=1e-4)
    elbo = elbo_per_example(model, raw, pipeline, labels=labels)
    gap = bound - (elbo[:, 0] - elbo[:, 1])  # (30,) IWAE_50 - ELBO, per example
    assert gap.mean() > 4 * gap.std() / math.sqrt(30)


def test_bits_per_dim():
    assert abs(bits_per_dim(-784 * math.log(2), 784) - 1.0) < 1e-12
    assert bits_per_dim(0.0, 10) == 0.0
