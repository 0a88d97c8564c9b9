"""Pareto k, replicate standard errors and the jackknife, on weights whose truth is known.

Log-normal weights log w ~ N(mu, s^2) have E[w] = exp(mu + s^2 / 2) exactly, a finite variance
for every s, and a tail that looks heavier and heavier at a finite k as s grows: the regime of
importance weights of a VAE whose q is too narrow. Generalized Pareto draws have a known shape.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaekit.estimate.diagnostics import (
    BlockedWeights,
    TailWeights,
    generalized_pareto_shape,
    replicate_variance_at,
    tail_size,
)


def lognormal_log_weights(samples: int, examples: int, sigma: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(samples, examples, generator=generator, dtype=torch.float64)


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, 0) - math.log(len(log_w))


@pytest.mark.parametrize("shape", [0.1, 0.5, 0.9])
def test_generalized_pareto_shape_recovers_a_known_tail(shape):
    rng = np.random.default_rng(0)
    u = rng.random((200, 500))
    draws = np.sort(2.0 / shape * ((1 - u) ** -shape - 1), axis=1)  # GPD(shape, scale 2)
    k = generalized_pareto_shape(torch.from_numpy(draws)).numpy()
    # the estimator's spread at n = 500 is about 0.05; the prior pulls towards 0.5 by 10/510
    expected = (shape * 500 + 5) / 510
    assert abs(k.mean() - expected) < 0.02
    assert 0.02 < k.std() < 0.1


def test_generalized_pareto_shape_agrees_with_scipy_maximum_likelihood():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for shape in (0.3, 0.7):
        draws = np.sort(stats.genpareto.rvs(shape, scale=1.5, size=2000, random_state=rng))
        ours = float(generalized_pareto_shape(torch.from_numpy(draws[None]))[0])
        theirs = stats.genpareto.fit(draws, floc=0)[0]
        assert abs(ours - (theirs * 2000 + 5) / 2010) < 0.05, (shape, ours, theirs)


def test_pareto_k_is_minus_infinity_for_equal_weights_and_rises_as_q_gets_worse():
    samples = 2000
    equal = TailWeights(samples)
    equal.add(torch.full((samples, 3), -91.5, dtype=torch.float64))  # q = exact posterior
    assert torch.all(equal.pareto_k() == -math.inf)
    means = []
    for sigma in (0.25, 1.0, 2.0, 3.0):
        tail = TailWeights(samples)
        tail.add(lognormal_log_weights(samples, 40, sigma, seed=2))
        means.append(float(tail.pareto_k().mean()))
    assert means[0] < 0.5 and means[-1] > 0.7
    assert means == sorted(means), means


def test_tail_and_blocks_do_not_depend_on_how_the_draws_are_chunked():
    log_w = lognormal_log_weights(1000, 7, 1.5, seed=3)
    whole_tail, chunked_tail = TailWeights(1000), TailWeights(1000)
    whole_blocks, chunked_blocks = BlockedWeights(1000), BlockedWeights(1000)
    whole_tail.add(log_w)
    whole_blocks.add(log_w, 0)
    for start in range(0, 1000, 333):
        chunked_tail.add(log_w[start:start + 333])
        chunked_blocks.add(log_w[start:start + 333], start)
    assert len(whole_tail.top) == tail_size(1000) + 1
    assert torch.equal(whole_tail.top, chunked_tail.top)
    assert torch.allclose(whole_blocks.log_sums, chunked_blocks.log_sums, rtol=0, atol=1e-12)
    assert torch.allclose(whole_blocks.estimate(), log_mean_exp(log_w), rtol=0, atol=1e-12)
    rise = whole_blocks.last_doubling_rise()
    half = 32 * (1000 // 64)  # 32 of the 64 blocks of 15 draws (40 left over)
    assert torch.allclose(rise, log_mean_exp(log_w) - log_mean_exp(log_w[:half]), atol=1e-12)


@pytest.mark.parametrize("samples", [10, 100, 1000])
def test_the_jackknife_has_less_bias_than_is_k(samples):
    sigma, examples = 1.5, 4000
    truth = sigma ** 2 / 2  # log E[w] for log w ~ N(0, sigma^2)
    log_w = lognormal_log_weights(samples, examples, sigma, seed=samples)
    blocks = BlockedWeights(samples, blocks=min(samples, 64))
    blocks.add(log_w, 0)
    is_k, jack = blocks.estimate(), blocks.jackknife()
    is_bias, jack_bias = float(is_k.mean()) - truth, float(jack.mean()) - truth
    jack_se = float(jack.std()) / math.sqrt(examples)
    assert is_bias < 0 and abs(jack_bias) < abs(is_bias), (is_bias, jack_bias)
    # what is left of the bias is within a few standard errors or a small part of IS_k's
    assert abs(jack_bias) < max(4 * jack_se, 0.35 * abs(is_bias)), (is_bias, jack_bias, jack_se)


def test_the_jackknife_of_equal_blocks_is_the_textbook_formula():
    log_w = lognormal_log_weights(64, 5, 1.0, seed=4)
    blocks = BlockedWeights(64, blocks=8)
    blocks.add(log_w, 0)
    groups = log_w.reshape(8, 8, 5)
    leave_out = torch.stack([log_mean_exp(torch.cat([groups[:b], groups[b + 1:]]).reshape(-1, 5))
                             for b in range(8)])
    textbook = 8 * log_mean_exp(log_w) - 7 * leave_out.mean(0)
    assert torch.allclose(blocks.jackknife(), textbook, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.5, 2.0, 2.5])
def test_replicate_standard_error_matches_the_spread_of_independent_runs(sigma):
    """Over 200 independent evaluations of 50 examples at k = 512, the replicate standard error
    of the dataset mean must match the spread of the means; for sigma = 2.5 (heavy at this k)
    the delta method falls below it."""
    samples, examples, runs = 512, 50, 200
    means, replicate_se, delta_se = [], [], []
    for run in range(runs):
        log_w = lognormal_log_weights(samples, examples, sigma, seed=1000 + run)
        blocks = BlockedWeights(samples)
        blocks.add(log_w, 0)
        means.append(float(blocks.estimate().mean()))
        total, _ = replicate_variance_at(blocks.replicate_levels(), samples)
        replicate_se.append(math.sqrt(total) / examples)
        w = torch.exp(log_w - log_w.max(0).values)
        relative = w / w.mean(0)
        delta_se.append(math.sqrt(float((relative.var(0) / samples).sum())) / examples)
    spread = float(np.std(means, ddof=1))
    # the spread of 200 means is itself known to about 1/sqrt(2 * 199) = 5 %
    typical = float(np.median(replicate_se))
    assert 0.75 * spread < typical < 1.3 * spread, (typical, spread)
    if sigma == 2.5:  # heavy at this k: the delta method is too small, the replicates are not
        delta = float(np.median(delta_se))
        assert delta < 0.85 * spread and abs(typical - spread) < abs(delta - spread)


# ------------------------------------------------------------------------------------------------
# On the linear-Gaussian oracle, through vaekit's own estimator

def _oracle(shift: float, shrink: float, examples: int = 200):
    from conftest import imperfect
    from vaekit.oracle import exact_log_px, linear_gaussian_vae, sample_data

    model = linear_gaussian_vae(20, 4, 0.5, seed=1)
    if shift or shrink != 1.0:
        model = imperfect(model, shift=shift, shrink=shrink)
    x = sample_data(model, examples, seed=2)
    return model, x, float(exact_log_px(model, x).mean())


def _summary(model, x, k: int, seed: int) -> dict:
    from vaekit.data import Pipeline
    from vaekit.estimate import evaluate

    pipeline = Pipeline("identity", "real", 0, description="oracle data (model space)")
    return evaluate(model, x, pipeline, k=k, seed=seed, naive=False).summary()


def test_on_the_oracle_the_jackknife_is_less_biased_than_is_k_at_every_k():
    model, x, exact = _oracle(shift=0.4, shrink=0.8)
    for k in (10, 100, 1000):
        runs = [_summary(model, x, k, seed) for seed in range(6)]
        is_error = np.array([r["log_px"] - exact for r in runs])
        jack_error = np.array([r["log_px_jackknife"] - exact for r in runs])
        noise = np.hypot(is_error.std(ddof=1), jack_error.std(ddof=1)) / math.sqrt(len(runs))
        assert is_error.mean() < -2 * noise, (k, is_error.mean(), noise)  # IS_k is biased low
        assert abs(jack_error.mean()) < abs(is_error.mean()), (k, is_error, jack_error)


def test_on_the_oracle_pareto_k_is_low_for_the_exact_posterior_and_rises_as_q_worsens():
    model, x, _ = _oracle(shift=0.0, shrink=1.0, examples=50)
    exact = _summary(model, x, 1000, seed=0)
    assert exact["pareto_k_high"] == 0
    assert all(k is None or k < 0.5 for k in exact["pareto_k"])
    means = []
    for shift, shrink in ((0.1, 0.95), (0.4, 0.8), (1.0, 0.6)):
        model, x, _ = _oracle(shift=shift, shrink=shrink, examples=50)
        summary = _summary(model, x, 1000, seed=0)
        means.append(summary["pareto_k_mean"])
    assert means == sorted(means) and means[-1] > 0.7, means
