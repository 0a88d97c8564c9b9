"""log p(x) estimators against the linear-Gaussian oracle, and `vaekit evaluate` end to end.

Statistical claims are checked with tolerances from standard errors, on seeded data and noise.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import imperfect, train_tiny
from torch.distributions import MultivariateNormal, kl_divergence

from vaekit.data import Pipeline, load_digits
from vaekit.distributed import DistContext
from vaekit.distributions import draw_from_noise, reparameterize
from vaekit.estimate import (
    FixedInputs,
    LogMeanExp,
    bits_per_dim,
    elbo_per_example,
    evaluate,
    evaluate_run,
    iwae_per_example,
    log_likelihood,
    log_mean_exp,
    log_weights,
    map_examples,
)
from vaekit.model import ModelConfig, build_vae
from vaekit.objectives import elbo_terms, iwae_terms
from vaekit.oracle import (
    exact_elbo,
    exact_log_px,
    linear_gaussian_vae,
    linear_parts,
    sample_data,
    set_exact_posterior,
)
from vaekit.randomness import FIXED_BLOCK, fixed_normal, per_example_normal
from vaekit.runs import load_run, load_run_dataset

ORACLE = Pipeline("identity", "real", 0, description="oracle data (model space)")


@pytest.fixture(scope="module")
def oracle():
    """A 20-d linear-Gaussian VAE with a 4-d latent, an imperfect encoder and 400 examples."""
    model = imperfect(linear_gaussian_vae(20, 4, 0.5, seed=1), shift=0.4, shrink=0.8)
    x = sample_data(model, 400, seed=2)
    return model, x, exact_log_px(model, x)


# ------------------------------------------------------------------------------------------------
# The estimators against the exact log p(x)


def test_importance_sampling_converges_to_the_exact_log_likelihood(oracle):
    model, x, exact = oracle
    summary = evaluate(model, x, ORACLE, k=5000, naive=False).summary()
    error = summary["log_px"] - float(exact.mean())
    assert abs(error) < 0.05  # nats per example, at k = 5000
    assert abs(error) < 5 * summary["log_px_se"]
    # the ELBO estimate agrees with the closed-form ELBO within its standard error
    elbo = float(exact_elbo(model, x).elbo.detach().mean())
    assert abs(summary["elbo"] - elbo) < 4 * summary["elbo_se"]
    assert summary["elbo_gap"] > 1.0  # the imperfect encoder leaves a real gap


def test_elbo_below_importance_sampling_below_exact_and_growing_with_k(oracle):
    model, x, exact = oracle
    weights = log_weights(model, x, 0, 1000)  # (1000, N): nested draws, IS_k uses the first k
    elbo = weights.mean(0)  # (N,) the ELBO estimated from the same draws
    previous = None
    for k in (1, 10, 100, 1000):
        estimate = log_mean_exp(weights[:k]).estimate  # (N,)
        above_elbo = estimate - elbo
        below_exact = exact - estimate
        n = len(x)
        if k > 1:
            assert above_elbo.mean() > 3 * above_elbo.std() / math.sqrt(n)
        assert below_exact.mean() > -3 * below_exact.std() / math.sqrt(n)
        if previous is not None:  # E[IS_k] grows with k (Burda et al. 2016, theorem 1)
            growth = estimate - previous
            assert growth.mean() > 3 * growth.std() / math.sqrt(n), k
        previous = estimate


def test_elbo_equals_log_px_with_the_exact_posterior():
    model = linear_gaussian_vae(20, 4, 0.5, seed=1)  # encoder = the true posterior
    x = sample_data(model, 100, seed=2)
    exact = exact_log_px(model, x)
    evaluation = evaluate(model, x, ORACLE, k=500, naive=False)
    per = evaluation.per_example
    # every importance weight is p(x) itself: zero variance, full effective sample size
    assert torch.allclose(per["log_px"], exact, atol=2e-4)
    assert float(per["log_px_var"].max()) < 1e-8
    assert torch.allclose(per["log_px_ess"], torch.full_like(exact, 500.0), rtol=1e-4)
    summary = evaluation.summary()
    assert summary["log_px_low_ess"] == 0 and summary["log_px_ess_min"] > 499
    assert abs(summary["elbo"] - float(exact.mean())) < 4 * summary["elbo_se"] + 1e-4
    assert abs(summary["elbo_gap"]) < 4 * summary["elbo_gap_se"] + 1e-4


def test_naive_estimator_converges_only_with_far_more_samples():
    model = linear_gaussian_vae(20, 4, 0.4, seed=3, column_scales=[1.5, 2.0, 3.0, 4.0])
    x = sample_data(model, 10, seed=4)
    exact = float(exact_log_px(model, x).mean())
    importance = float(log_mean_exp(log_weights(model, x, 0, 5000)).estimate.mean())
    naive = log_weights(model, x, 0, 200_000, proposal="prior")  # (k, N)
    at_5000 = log_mean_exp(naive[:5000])
    at_200k = log_mean_exp(naive)
    naive_error = exact - float(at_5000.estimate.mean())
    assert abs(importance - exact) < 0.01  # the encoder is exact here
    assert naive_error > 0.5  # far off at the same k
    assert float(at_5000.effective_sample_size.mean()) < 0.01 * 5000
    # ... and close only with 40 times more samples
    assert abs(exact - float(at_200k.estimate.mean())) < 0.15
    assert abs(exact - float(at_200k.estimate.mean())) < naive_error / 5


def test_95_percent_intervals_cover_the_truth_at_their_nominal_rate():
    model = imperfect(linear_gaussian_vae(20, 4, 0.5, seed=1), shift=0.3, shrink=0.9)
    x = sample_data(model, 20, seed=2)
    exact = float(exact_log_px(model, x).mean())
    exact_bound = float(exact_elbo(model, x).elbo.detach().mean())
    repeats = 400
    covered_log_px = covered_elbo = 0
    for seed in range(repeats):
        summary = evaluate(model, x, ORACLE, k=100, seed=seed, naive=False).summary()
        covered_log_px += abs(summary["log_px"] - exact) <= 1.96 * summary["log_px_se"]
        covered_elbo += abs(summary["elbo"] - exact_bound) <= 1.96 * summary["elbo_se"]
    tolerance = 3 * math.sqrt(0.95 * 0.05 / repeats)  # three binomial standard errors
    assert abs(covered_log_px / repeats - 0.95) < tolerance
    assert abs(covered_elbo / repeats - 0.95) < tolerance


# ------------------------------------------------------------------------------------------------
# Noise, chunking and processes


def test_per_example_noise_depends_only_on_example_and_sample_index():
    key = (7, "test")
    whole = per_example_normal((3,), 0, 10, 0, 1200, key)  # (1200, 10, 3)
    part = per_example_normal((3,), 4, 7, 450, 1010, key)
    assert torch.equal(part, whole[450:1010, 4:7])
    assert not torch.equal(per_example_normal((3,), 0, 10, 0, 1200, (8, "test")), whole)
    # samples look like N(0, 1): mean and variance within their standard errors
    flat = whole.flatten()
    assert abs(float(flat.mean())) < 4 / math.sqrt(len(flat))
    assert abs(float(flat.var()) - 1) < 4 * math.sqrt(2 / len(flat))


def test_results_do_not_depend_on_batch_size_or_sample_chunks(oracle, monkeypatch):
    model, x, _ = oracle
    x = x[:13]
    first = evaluate(model, x, ORACLE, k=700, batch_size=13).per_example
    second = evaluate(model, x, ORACLE, k=700, batch_size=4).per_example
    import vaekit.estimate.chunks as chunks

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 37 * 80)  # blocks of 37 samples
    assert chunks.sample_block(model, 700) == 37
    third = evaluate(model, x, ORACLE, k=700, batch_size=3).per_example
    for name in ("log_px", "log_px_var", "elbo", "log_px_naive", "kl_per_dim"):
        assert torch.allclose(first[name], second[name], atol=1e-5, rtol=1e-6), name
        assert torch.allclose(first[name], third[name], atol=1e-5, rtol=1e-6), name
    # IS_k at a smaller k is the estimate from the first k draws of a larger one
    smaller = evaluate(model, x, ORACLE, k=300, naive=False).per_example["log_px"]
    assert torch.allclose(smaller, log_mean_exp(log_weights(model, x, 0, 700)[:300]).estimate,
                          atol=1e-5)


class ShardOnly(DistContext):
    """One process's share of a distributed run, without the final sum across processes."""

    def all_reduce_sum(self, tensor):
        return tensor


def test_processes_share_the_examples_and_sum_to_the_single_process_result(oracle):
    model, x, _ = oracle
    x = x[:30]

    def fn(batch, start, stop):
        return torch.stack([evaluate_batch_log_px(model, batch, start)], dim=1)

    alone = map_examples(fn, x, ORACLE, "test", 4, torch.device("cpu"))
    shards = [map_examples(fn, x, ORACLE, "test", 4, torch.device("cpu"),
                           dist=ShardOnly(rank=rank, world_size=3)) for rank in range(3)]
    assert all(float(s.abs().sum()) > 0 for s in shards)  # every process did some chunks
    assert torch.equal(sum(shards), alone)


def evaluate_batch_log_px(model, x, start):
    from vaekit.estimate import evaluate_batch

    return evaluate_batch(model, x, start, k=50, seed=0, split="test", naive=False)[:, 0]


def test_log_mean_exp_streams_exactly_and_survives_huge_log_weights():
    torch.manual_seed(0)
    log_w = torch.randn(1000, 5, dtype=torch.float64) * 3 - 800  # exp() underflows in float64
    streamed = LogMeanExp()
    for block in log_w.split(77):
        streamed.add(block, companion=block)
    direct = torch.logsumexp(log_w, 0) - math.log(1000)
    assert torch.allclose(streamed.estimate, direct, atol=1e-10)
    w = torch.exp(log_w - log_w.max(0).values)
    r = w / w.mean(0)
    assert torch.allclose(streamed.variance, r.var(0) / 1000, rtol=1e-8)
    assert torch.allclose(streamed.effective_sample_size, w.sum(0) ** 2 / (w ** 2).sum(0))
    assert torch.allclose(streamed.companion.mean, log_w.mean(0))
    gap = r - log_w  # the gap's delta-method variance: Var(r - c) / k
    assert torch.allclose(streamed.gap_variance, gap.var(0) / 1000, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# The fast path: decoder passes over slices of samples, the Bernoulli scorer, inputs per block


@pytest.fixture(scope="module")
def bernoulli(tiny_run):
    """A small trained Bernoulli MLP (8x8 digits, 4-d latent), 40 test images and its pipeline."""
    run = load_run(tiny_run)
    raw = load_run_dataset(run).test_x[:40]  # (40, 1, 8, 8) uint8
    return run.model.eval(), raw, run.pipeline


def decoders():
    """Models whose log p(x|z) takes each path of log_likelihood, with binary data (and class
    labels for the conditional one)."""
    torch.manual_seed(0)
    binary = (torch.rand(6, 1, 6, 6) < 0.4).float()  # (6, 1, 6, 6)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    configs = {
        "mlp relu": dict(hidden=[16]),
        "mlp tanh, two layers": dict(hidden=[16, 8], activation="tanh"),
        "linear": dict(hidden=[]),
        "conditional mlp": dict(hidden=[16], num_classes=3),
        "conv": dict(net="conv", hidden=[16]),
    }
    for name, config in configs.items():
        model = build_vae(ModelConfig(data_shape=(1, 6, 6), latent_dim=3, **config)).eval()
        yield name, model, binary, labels if model.conditional else None


@pytest.mark.parametrize("samples_per_pass", [1, 7, 60])
def test_log_likelihood_in_slices_equals_decoding_every_sample_at_once(oracle, bernoulli,
                                                                       samples_per_pass):
    import vaekit.estimate.decoding as decoding

    model, raw, pipeline = bernoulli
    cases = [("oracle (Gaussian)", oracle[0], oracle[1][:6], None),
             ("trained digits MLP", model, pipeline.fixed(raw[:6], 0), None), *decoders()]
    for name, net, x, y in cases:
        with torch.inference_mode():
            z = net.encode(x, y).sample((60,))  # (60, 6, D)
            expected = net.decode(z, y).log_prob(x)  # (60, 6)
            sliced = log_likelihood(net, z, x, samples_per_pass, y)
        assert sliced.shape == expected.shape, name
        assert torch.allclose(sliced, expected, rtol=1e-6, atol=1e-4), name
        # MLP decoders can run layer by layer into reused buffers; conv decoders as modules
        assert (decoding._mlp_layers(net) is None) == (name == "conv")


def test_log_likelihood_with_gradients_takes_the_distribution_path():
    _, model, x, _ = next(decoders())
    z = model.encode(x).rsample((5,))  # (5, 6, 3), differentiable in the encoder
    value = log_likelihood(model, z, x, 2)
    assert torch.allclose(value, model.decode(z).log_prob(x))
    value.sum().backward()  # no in-place step got in the way of autograd
    assert all(p.grad is not None for p in model.encoder.parameters())


def plain_evaluation(model, x, k):
    """log p(x), the ELBO's reconstruction term and the naive estimate per example, computed
    the plain way (every sample decoded at once, distribution objects, float64 logsumexp) from
    the noise evaluate draws for each (example, sample)."""
    n, latent = len(x), model.latent_dim
    with torch.inference_mode():
        q = model.encode(x)
        z = reparameterize(q, per_example_normal((latent,), 0, n, 0, k, (0, "importance", "test")))
        log_px_z = model.decode(z).log_prob(x).double()  # (k, N)
        log_w = log_px_z + (model.prior.log_prob(z) - q.log_prob(z)).double()  # (k, N)
        prior_z = draw_from_noise(model.prior,
                                  per_example_normal((latent,), 0, n, 0, k, (0, "naive", "test")))
        naive = model.decode(prior_z).log_prob(x).double()  # (k, N)
        kl = kl_divergence(q, model.prior).double()  # (N,)
    log_mean = (lambda a: torch.logsumexp(a, 0) - math.log(k))
    return {"log_px": log_mean(log_w), "reconstruction": log_px_z.mean(0),
            "elbo": log_px_z.mean(0) - kl, "log_px_naive": log_mean(naive)}


def test_evaluate_equals_the_plain_computation_with_the_same_noise(oracle, bernoulli,
                                                                   monkeypatch):
    import vaekit.estimate as estimate

    model, raw, pipeline = bernoulli
    cases = [(oracle[0], oracle[1][:25], ORACLE), (model, raw[:25], pipeline)]
    for net, data, pipe in cases:
        expected = plain_evaluation(net, pipe.fixed(data, 0), k=700)
        evaluations = [evaluate(net, data, pipe, k=700, batch_size=7).per_example]
        with monkeypatch.context() as patch:  # one sample of every example per decoder pass
            patch.setattr(estimate, "DECODE_ELEMENTS", 1)
            evaluations.append(evaluate(net, data, pipe, k=700, batch_size=25).per_example)
        for per in evaluations:
            for name, values in expected.items():
                assert torch.allclose(per[name], values, rtol=1e-6, atol=2e-4), name


def test_inputs_are_made_once_per_noise_block_and_equal_the_pipeline_on_every_chunk():
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (FIXED_BLOCK + 300, 1, 2, 2), dtype=torch.uint8)
    pipeline = Pipeline("binarize", "image8", 5)
    calls = []

    class Counting(Pipeline):
        def fixed(self, raw, start, split="test"):
            calls.append(len(raw))
            return super().fixed(raw, start, split)

    counting = Counting("binarize", "image8", 5)
    inputs = FixedInputs(raw, counting, "test", torch.device("cpu"))
    for start in range(0, len(raw), 250):  # the chunk 1000..1250 straddles two noise blocks
        stop = min(len(raw), start + 250)
        assert torch.equal(inputs(start, stop), pipeline.fixed(raw[start:stop], start))
    assert calls == [FIXED_BLOCK, 250, 300]  # block 0, the straddling chunk, block 1 (the rest)


# ------------------------------------------------------------------------------------------------
# Active units, KL per dimension, bits per dimension, units


def test_active_units_and_kl_per_dimension_match_the_oracle():
    # latent dimensions 0 and 2 have no decoder weight: their posterior is the prior
    model = linear_gaussian_vae(10, 4, 0.5, seed=6, column_scales=[0.0, 2.0, 0.0, 1.0])
    x = sample_data(model, 300, seed=7)
    summary = evaluate(model, x, ORACLE, k=20, naive=False).summary()
    assert summary["active_units"] == 2
    assert summary["latent_dim"] == 4
    kl = summary["kl_per_dim"]
    assert kl[0] < 1e-6 and kl[2] < 1e-6 and kl[1] > 0.5 and kl[3] > 0.1
    assert math.isclose(sum(kl), summary["kl"], rel_tol=1e-9)
    # closed form: KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2, averaged over x
    q = model.encode(x)
    loc, scale = q.base_dist.loc.double(), q.base_dist.scale.double()
    expected = (0.5 * (loc ** 2 + scale ** 2 - 1 - 2 * scale.log())).mean(0)
    assert torch.allclose(torch.tensor(kl, dtype=torch.float64), expected, atol=1e-5)
    assert summary["kl_exact"] and summary["kl_se"] == 0.0


def test_log_densities_of_standardised_arrays_are_in_the_data_units(tmp_path):
    """A linear-Gaussian run on real arrays: the reported log p(x) is the density of the
    original values, computed here straight from the model's marginal in those units."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(600, 2))
    data = latent @ rng.normal(size=(2, 6)) * np.array([1, 5, 0.5, 2, 10, 1]) + 3.0
    data = data + rng.normal(size=data.shape) * 0.3
    np.save(tmp_path / "arrays.npy", data.astype(np.float32))
    run_dir = train_tiny(tmp_path / "run", data=str(tmp_path / "arrays.npy"), hidden=[],
                         latent_dim=2, likelihood="gaussian", gaussian_scale=0.3, epochs=15)
    run = load_run(run_dir)
    set_exact_posterior(run.model)  # p(x) unchanged; every importance weight is then p(x)
    dataset = load_run_dataset(run)
    result = evaluate_run(run, dataset, k=50)
    # p(original) = N(mean + std * b, D (W W^T + s^2 I) D) with D = diag(std)
    parts = linear_parts(run.model)
    mean, std = run.pipeline.mean.double().flatten(), run.pipeline.std.double().flatten()
    covariance = (std[:, None] * (parts.weight @ parts.weight.T + torch.diag(parts.variance))
                  * std[None, :])
    marginal = MultivariateNormal(mean + std * parts.bias, covariance_matrix=covariance)
    exact = float(marginal.log_prob(dataset.test_x.double()).mean())
    assert run.pipeline.log_jacobian != 0
    assert abs(result["log_px"] - exact) < 1e-3
    assert abs(result["elbo"] - exact) < 5 * result["elbo_se"] + 1e-3
    assert "bits_per_dim" not in result  # a density of real values, not discrete data


def test_bits_per_dimension_for_binary_pixels(tiny_run):
    run = load_run(tiny_run)
    result = evaluate_run(run, load_run_dataset(run), k=50, limit=40)
    assert result["bits_per_dim"] == pytest.approx(-result["log_px"] / (64 * math.log(2)))
    assert result["bits_per_dim_se"] == pytest.approx(result["log_px_se"] / (64 * math.log(2)))
    assert result["likelihood_of"] == run.pipeline.description
    assert result["n"] == 40 and result["k"] == 50
    assert result["log_px"] < 0  # a log-probability of binary pixels


# ------------------------------------------------------------------------------------------------
# `vaekit evaluate`


def test_evaluate_command_writes_json_and_prints_a_table(vaekit_cli, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = vaekit_cli("evaluate", run, "--k", "100", "--limit", "50", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)  # the object alone on stdout
    written = json.loads((run / "evaluation.json").read_text())
    assert printed == written
    for key in ("n", "k", "elbo", "reconstruction", "kl", "log_px", "log_px_se", "log_px_naive",
                "log_px_naive_se", "elbo_gap", "active_units", "kl_per_dim", "bits_per_dim",
                "likelihood_of"):
        assert key in written, key
    assert written["n"] == 50 and written["k"] == 100
    assert len(written["kl_per_dim"]) == 4
    assert written["elbo"] < written["log_px"]
    assert "Bernoulli" in written["likelihood_of"]

    table = vaekit_cli("evaluate", run, "--k", "20", "--limit", "10", "--split", "train",
                       "--seed", "3", "--no-progress")
    assert table.returncode == 0, table.stderr
    assert "log p(x)  importance sampled" in table.stdout
    assert "k = 20" in table.stdout and "Bernoulli" in table.stdout
    again = json.loads((run / "evaluation.json").read_text())
    assert again["split"] == "train" and again["seed"] == 3 and again["n"] == 10


def test_evaluate_command_errors_are_one_line(vaekit_cli, tmp_path):
    result = vaekit_cli("evaluate", tmp_path / "missing")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    result = vaekit_cli("evaluate", tmp_path, "--k", "0")
    assert result.returncode == 2 and "positive integer" in result.stderr


def test_a_proposal_that_misses_the_posterior_is_flagged_by_its_effective_sample_size():
    model = linear_gaussian_vae(20, 4, 0.3, seed=1, column_scales=[2.0, 3.0, 4.0, 5.0])
    with torch.no_grad():  # q(z|x) narrow and 0.5 away from the true posterior mean
        model.encoder.net[0].bias[:4] += 0.5
        model.encoder.net[0].bias[4:] -= 1.0
    x = sample_data(model, 50, seed=2)
    summary = evaluate(model, x, ORACLE, k=1000, naive=False).summary()
    assert summary["log_px_low_ess"] > 25
    assert summary["log_px_ess_min"] < 10
    # ... and rightly so: the estimate is too low by far more than its error bar says
    assert float(exact_log_px(model, x).mean()) - summary["log_px"] > 5 * summary["log_px_se"]


# ------------------------------------------------------------------------------------------------
# Labels of a conditional model, the IWAE bound, bits/dim


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


def test_evaluate_gives_a_conditional_model_its_labels():
    data, pipeline, model = _conditional_digits()
    raw, labels = data.test_x[:12], data.test_y[:12]
    right = evaluate(model, raw, pipeline, k=50, labels=labels).per_example["log_px"]
    wrong = evaluate(model, raw, pipeline, k=50, labels=(labels + 3) % 10).per_example["log_px"]
    assert not torch.allclose(right, wrong)
    # the same figure as the IWAE bound with the same number of samples, within its error
    bound = iwae_per_example(model, raw, pipeline, 50, labels=labels)
    difference = right - bound  # (12,) two independent estimates of E[IWAE_50]
    assert abs(difference.mean()) < 5 * difference.std() / math.sqrt(12) + 1e-3


@pytest.mark.parametrize("prior", ["mixture", "vamp"])
def test_evaluate_with_a_prior_that_does_not_factorise(prior):
    torch.manual_seed(1)
    data = load_digits()
    pipeline = Pipeline.build(data, "bernoulli", "dynamic", 0)
    model = build_vae(ModelConfig(data_shape=(1, 8, 8), latent_dim=3, hidden=[16], prior=prior,
                                  prior_components=5))
    raw = data.test_x[:10]
    evaluation = evaluate(model, raw, pipeline, k=200)
    per = evaluation.per_example
    assert torch.isfinite(per["log_px"]).all() and torch.isfinite(per["log_px_naive"]).all()
    assert torch.isnan(per["kl_per_dim"]).all()  # no per-dimension KL without a factorised p(z)
    gap = per["log_px"] - per["elbo"]  # IS_200 >= ELBO on average
    assert gap.mean() > 0
    # the ELBO agrees with the library's one-sample ELBO averaged over many draws
    x = pipeline.fixed(raw, 0)
    with torch.no_grad():
        elbos = torch.stack([elbo_terms(model, x).elbo for _ in range(400)]).double()  # (400, 10)
    se = (per["elbo_var"].sqrt() ** 2 + elbos.var(0) / 400).sqrt()
    assert torch.all((per["elbo"] - elbos.mean(0)).abs() < 5 * se)


def test_evaluate_run_of_a_conditional_run_reports_log_p_x_given_y(tmp_path):
    run_dir = train_tiny(tmp_path / "cond", conditional=True, epochs=1)
    run = load_run(run_dir)
    result = evaluate_run(run, load_run_dataset(run), k=20, limit=30)
    assert result["conditional"] is True and "log p(x | y)" in result["likelihood_of"]
    assert result["log_px"] >= result["elbo"] - 3 * result["elbo_se"]


def test_limit_takes_a_seeded_random_subset_and_records_it(tiny_run):
    from vaekit.estimate.evaluation import subset_rows

    run = load_run(tiny_run)
    dataset = load_run_dataset(run)
    total = len(dataset.test_x)
    result = evaluate_run(run, dataset, k=20, limit=30, seed=3)
    rows = result["subset"]["rows"]
    assert result["n"] == 30 and result["subset"]["of"] == total and result["subset"]["seed"] == 3
    assert rows == sorted(set(rows)) and len(rows) == 30 and rows != list(range(30))
    assert rows == subset_rows(total, 30, 3).tolist()  # the same seed, the same subset
    assert subset_rows(total, 30, 4).tolist() != rows
    # the figures are those of exactly these rows: the whole split's per-example terms there
    whole = evaluate_run(run, dataset, k=20, seed=3)
    assert whole["subset"] is None and whole["n"] == total
    # a split ordered by class (as an image folder's) gives several classes to the subset
    ordered = torch.arange(total) * 10 // total  # (N,) labels 0..9 in blocks
    assert len(set(ordered[subset_rows(total, 30, 0)].tolist())) >= 5


def test_evaluate_without_k_chooses_it_for_the_time_budget(tiny_run):
    from vaekit.estimate.evaluation import K_LADDER, choose_k

    run = load_run(tiny_run)
    dataset = load_run_dataset(run)
    generous = choose_k(run, dataset, split="test", n=10, budget_seconds=1e6, naive=True)
    assert generous["k"] == K_LADDER[0]
    tight = choose_k(run, dataset, split="test", n=10**6, budget_seconds=1.0, naive=True)
    assert tight["k"] == K_LADDER[-1] and tight["expected_seconds"] > 1.0
    middle_budget = 10 * 300 * generous["seconds_per_sample"] * 1000  # about k = 1000
    chosen = choose_k(run, dataset, split="test", n=300, budget_seconds=middle_budget,
                      naive=True)
    assert chosen["expected_seconds"] <= middle_budget or chosen["k"] == K_LADDER[-1]
    assert chosen["k"] in K_LADDER
