"""Per-example scores against the linear-Gaussian oracle; new data through a run's pipeline;
the cached test-set scores."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from vaekit.data import Pipeline
from vaekit.errors import DataError
from vaekit.oracle import exact_elbo, exact_log_px, linear_gaussian_vae, sample_data
from vaekit.runs import load_run
from vaekit.scoring import (load_new_data, percentiles, score_examples, reference_scores,
                            reference_cache_path)

IDENTITY = Pipeline("identity", "real", 0)


def oracle_with_inexact_encoder(seed: int = 0):
    """A linear-Gaussian VAE whose encoder is off the true posterior, so that importance
    sampling has real Monte Carlo error to report."""
    model = linear_gaussian_vae(data_dim=6, latent_dim=2, sigma=0.6, seed=seed)
    encoder = model.encoder.net[0]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        encoder.weight.add_(0.05 * torch.randn(encoder.weight.shape, generator=generator))
        encoder.bias[2:] += 0.5  # posterior scales too wide
    return model


def test_per_example_log_px_equals_the_exact_value_within_its_standard_error():
    model = oracle_with_inexact_encoder()
    x = sample_data(model, 60, seed=1)  # (60, 6)
    scores = score_examples(model, x, IDENTITY, k=400, seed=0)
    exact = exact_log_px(model, x).numpy()
    assert (scores.log_px_se > 0).all() and (scores.log_px_ess < 400).all()
    z = (scores.log_px - exact) / scores.log_px_se
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    assert abs(z.mean()) < 4.5 / np.sqrt(len(z))  # no bias beyond the noise
    elbo = exact_elbo(model, x)
    exact_elbo_value = (elbo.reconstruction - elbo.kl).detach().numpy()
    assert np.abs((scores.elbo - exact_elbo_value) / scores.elbo_se).max() < 4.5
    np.testing.assert_allclose(scores.kl, elbo.kl.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert (scores.elbo <= exact + 1e-9).all()  # the ELBO bounds log p(x)
    with torch.no_grad():
        code = model.encode(x).mean
        expected_error = (model.decode(code).mean - x).square().mean(1).double().numpy()
    np.testing.assert_allclose(scores.reconstruction_error, expected_error, rtol=1e-5)
    np.testing.assert_allclose(scores.posterior_mean, code.double().numpy(), rtol=1e-6)
    assert scores.bits_per_dim is None  # a density: no bits per dimension


def test_scores_do_not_depend_on_the_batch_size_and_repeat_exactly():
    model = oracle_with_inexact_encoder(seed=2)
    x = sample_data(model, 30, seed=3)
    first = score_examples(model, x, IDENTITY, k=50, seed=5)
    again = score_examples(model, x, IDENTITY, k=50, seed=5, batch_size=7)
    # the same draws; only float rounding of the batched matrix products differs
    np.testing.assert_allclose(first.log_px, again.log_px, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(first.log_px, score_examples(model, x, IDENTITY, k=50,
                                                               seed=5).log_px)
    other = score_examples(model, x, IDENTITY, k=50, seed=6)
    assert not np.array_equal(first.log_px, other.log_px)


def test_large_inputs_are_scored_in_chunks_that_agree_with_the_exact_values(monkeypatch):
    import vaekit.scoring as scoring

    model = oracle_with_inexact_encoder(seed=4)
    x = sample_data(model, 25, seed=5)
    monkeypatch.setattr(scoring, "SCORE_CHUNK", 8)  # four chunks, the last one short
    scores = score_examples(model, x, IDENTITY, k=300, seed=0)
    exact = exact_log_px(model, x).numpy()
    assert len(scores) == 25
    assert np.abs((scores.log_px - exact) / scores.log_px_se).max() < 4.5


def test_percentiles_among_reference_values():
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    assert percentiles(np.array([0.0, 2.0, 2.5, 9.0]), reference).tolist() == \
        [0.0, 37.5, 50.0, 100.0]


def test_test_scores_are_cached_for_the_weights_and_recomputed_when_they_change(tiny_run,
                                                                                  tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    run = load_run(run_dir)
    first = reference_scores(run, 20, 0)
    path = reference_cache_path(run, 20, 0)
    assert path.is_file() and len(first) == run.data["n_test"]
    assert not list(run_dir.glob(".*.tmp"))  # written atomically

    def no_dataset():
        raise AssertionError("the cache should have been used")

    cached = reference_scores(run, 20, 0, load_dataset=no_dataset)
    np.testing.assert_array_equal(cached.log_px, first.log_px)
    # other weights: the cache no longer applies
    with torch.no_grad():
        for parameter in run.model.decoder.parameters():
            parameter.mul_(0.5)
    from vaekit.runs import atomic_write_bytes, model_weights_bytes

    atomic_write_bytes(run_dir / "model.safetensors", model_weights_bytes(run.model))
    changed = reference_scores(load_run(run_dir), 20, 0)
    assert not np.allclose(changed.log_px, first.log_px)
    # a damaged cache is recomputed and replaced
    path.write_bytes(b"not safetensors")
    again = reference_scores(load_run(run_dir), 20, 0)
    np.testing.assert_array_equal(again.log_px, changed.log_px)


def test_new_images_go_through_the_run_pipeline(tiny_run, tmp_path):
    from PIL import Image

    run = load_run(tiny_run)  # digits: 1 x 8 x 8, binarised
    folder = tmp_path / "rgb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # colour images of the run's size are converted to grey
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    raw, what = load_new_data(run, str(folder))
    assert raw.shape == (3, 1, 8, 8) and raw.dtype == torch.uint8 and "3 images" in what
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(big / "a.png")
    with pytest.raises(DataError, match="16 x 16 but .* 1 x 8 x 8"):
        load_new_data(run, str(big))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_new_data(run, str(empty))
    np.save(tmp_path / "real.npy", rng.random((4, 64)))
    with pytest.raises(DataError, match="real-valued arrays but .* 8-bit images"):
        load_new_data(run, str(tmp_path / "real.npy"))
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (5, 8, 8), dtype=np.uint8))
    raw, _ = load_new_data(run, str(tmp_path / "images.npy"))
    assert raw.shape == (5, 1, 8, 8)
    from conftest import write_idx

    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz",
              rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), gz=True)
    raw, _ = load_new_data(run, str(tmp_path / "t10k-images-idx3-ubyte.gz"))
    assert raw.shape == (6, 1, 8, 8)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(6, np.uint8))
    with pytest.raises(DataError, match="labels file"):
        load_new_data(run, str(tmp_path / "t10k-labels-idx1-ubyte"))


def test_noise_streams_are_named_by_content():
    from vaekit.scoring import data_key

    a = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8)
    assert data_key(a) == data_key(a.clone())
    assert data_key(a) != data_key(a.flip(-1)) != data_key(a.reshape(1, 64))
