"""Shared fixtures: small trained runs and a way to call the real `vaekit` command."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Tests share two CPU cores: one thread per process keeps parallel subprocesses from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Image folders are decoded into the cache: tests keep theirs out of the user's ~/.cache.
os.environ.setdefault("VAEKIT_CACHE", tempfile.mkdtemp(prefix="vaekit-test-cache-"))


def run_vaekit(*args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m vaekit ARGS` as a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vaekit", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def seeded_global_generators():
    """Every test starts from the same global random state, whatever ran before it, so a test
    that draws without its own generator gives the same result alone, in any order, anywhere."""
    import random

    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def vaekit_cli():
    return run_vaekit


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write a uint8 array as an IDX file (the MNIST format), optionally gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_fake_mnist(folder: Path, n_train: int = 64, n_test: int = 16, gz: bool = True,
                     seed: int = 0) -> Path:
    """Four small IDX files in MNIST's layout: random strokes on 28x28, labels 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = (rng.random((n, 28, 28)) < 0.2).astype(np.uint8) * 255
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    return folder


@pytest.fixture
def fake_mnist(tmp_path):
    return write_fake_mnist(tmp_path / "mnist")


TINY = dict(epochs=3, batch_size=64, hidden=[64], latent_dim=4, progress=False,
            checkpoint_every_minutes=60.0)


def train_tiny(out: Path, **overrides) -> Path:
    from vaekit.config import TrainConfig
    from vaekit.train import train

    config = TrainConfig(**{**TINY, **overrides, "out": str(out)})
    return train(config, log=lambda *a, **k: None)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A digits MLP run of 3 short epochs (read-only: copy it before changing it)."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture(scope="session")
def tiny_conv_run(tmp_path_factory) -> Path:
    """A digits conv run of 2 short epochs (read-only)."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "tiny-conv", net="conv", epochs=2)


def imperfect(model, shift: float, shrink: float):
    """Move the encoder off the exact posterior: wider scales, shrunken means."""
    import torch

    latent = model.latent_dim
    with torch.no_grad():
        model.encoder.net[0].bias[latent:] += shift
        model.encoder.net[0].weight[:latent] *= shrink
    return model


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """A cache folder holding the digits' feature network, trained once per test session: use
    it with monkeypatch.setenv("VAEKIT_CACHE", str(feature_cache)) (read-only)."""
    from vaekit.data import load_dataset
    from vaekit.features import save_features, train_feature_net

    folder = tmp_path_factory.mktemp("cache")
    dataset = load_dataset("digits")
    save_features(train_feature_net(dataset), folder / "features" /
                  f"{dataset.fingerprint()}.safetensors")
    return folder


def assert_resumes_exactly(vaekit_cli, tmp_path, options: list) -> "Path":
    """Train 2 epochs straight and 1 + 1 with --resume: the weights must be bit-identical.
    Returns the straight run's folder."""
    import torch
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    result = vaekit_cli("train", *options, "--epochs", "2", "--out", straight)
    assert result.returncode == 0, result.stderr
    assert vaekit_cli("train", *options, "--epochs", "1", "--out", split).returncode == 0
    result = vaekit_cli("train", "--resume", split, "--epochs", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    weights = [load_file(run / "model.safetensors") for run in (straight, split)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    return straight
