"""gradients.py: the reparameterisation and score-function estimators of the ELBO's gradient."""

from __future__ import annotations

import math

import torch
from conftest import imperfect

from vaekit.gradients import elbo_gradient, gradient_variance
from vaekit.oracle import exact_elbo, linear_gaussian_vae, sample_data
from vaekit.randomness import per_example_normal


def test_both_gradient_estimators_are_unbiased_and_reparameterisation_has_less_variance():
    model = imperfect(linear_gaussian_vae(6, 2, 0.5, seed=8), shift=0.3, shrink=0.8)
    x = sample_data(model, 4, seed=9)
    params = list(model.encoder.parameters())
    exact = torch.autograd.grad(exact_elbo(model, x).elbo.mean(), params)
    exact = torch.cat([g.reshape(-1) for g in exact]).double()
    for estimator in ("reparameterisation", "score-function"):
        draws = []
        for repeat in range(400):
            eps = per_example_normal((2,), 0, 4, 0, 20, (0, "test-gradient", repeat))
            draws.append(torch.cat([g.reshape(-1) for g in
                                    elbo_gradient(model, x, eps, estimator)]).double())
        draws = torch.stack(draws)  # (R, P)
        se = draws.std(0) / math.sqrt(len(draws))
        z = (draws.mean(0) - exact) / se.clamp_min(1e-12)
        assert float(z.abs().max()) < 4.5, estimator  # 30 parameters, each within 4.5 s.e.
    results = gradient_variance(model, x, samples=(1, 10), repeats=50, seed=0)
    by = {(r.estimator, r.samples): r for r in results}
    for count in (1, 10):
        assert by["score-function", count].variance > 3 * by["reparameterisation", count].variance
    # variance falls with the sample count
    assert by["reparameterisation", 10].variance < by["reparameterisation", 1].variance / 3


def test_the_old_import_path_from_estimate_keeps_working():
    import vaekit.estimate as estimate

    assert estimate.gradient_variance is gradient_variance
    assert estimate.elbo_gradient is elbo_gradient
