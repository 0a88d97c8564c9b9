"""The feature network of sample-quality scores: trained offline, cached by fingerprint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from vaekit.data import load_dataset
from vaekit.errors import DataError
from vaekit.features import (
    FEATURES,
    data_units,
    feature_file,
    features_for,
    load_features,
    train_feature_net,
)
from vaekit.sample_metrics import Reference, score_samples


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_the_cached_network_is_a_safetensors_file_keyed_by_the_fingerprint(
        feature_cache, monkeypatch, digits):
    monkeypatch.setenv("VAEKIT_CACHE", str(feature_cache))
    path = feature_file(digits)
    assert path == feature_cache / "features" / f"{digits.fingerprint()}.safetensors"
    with safe_open(str(path), framework="pt") as handle:  # safetensors, no pickle
        info = json.loads(handle.metadata()["vaekit_features"])
    assert info["fingerprint"] == digits.fingerprint() and info["kind"] == "classifier"
    features = features_for(digits)
    assert features.info["cached"] is True
    assert features.info["test_accuracy"] > 0.95  # 8x8 digits: a small CNN gets ~98 %
    x = data_units(digits, digits.test_x[:50])
    again = features_for(digits)
    assert torch.equal(features(x), again(x))  # every run on these data sees the same features
    assert features(x).shape == (50, FEATURES)


def test_features_are_trained_and_cached_when_missing(tmp_path, monkeypatch, digits):
    small = dataclasses.replace(digits, train_x=digits.train_x[:300],
                                train_y=digits.train_y[:300])
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path))
    features = features_for(small)
    assert features.info["cached"] is False
    assert feature_file(small).is_file()
    assert not list(feature_file(small).parent.glob("*.tmp"))  # written atomically
    assert features_for(small).info["cached"] is True


def test_training_is_deterministic(digits):
    small = dataclasses.replace(digits, train_x=digits.train_x[:200],
                                train_y=digits.train_y[:200])
    x = data_units(digits, digits.test_x[:20])
    first, second = train_feature_net(small, steps=30), train_feature_net(small, steps=30)
    assert torch.equal(first(x), second(x))


def test_damaged_or_foreign_cache_files_get_one_line(tmp_path, monkeypatch, digits,
                                                      feature_cache):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path))
    path = feature_file(digits)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="delete .* and vaekit trains it again") as error:
        features_for(digits)
    assert "\n" not in str(error.value)
    other = dataclasses.replace(digits, test_x=digits.test_x[:100], test_y=digits.test_y[:100])
    with pytest.raises(DataError, match="no feature network of these data"):
        load_features(feature_cache / "features" / f"{digits.fingerprint()}.safetensors", other)


def test_unlabelled_data_get_an_autoencoder_whose_features_still_rank_damage(digits):
    """Without labels the features come from an autoencoder. They must still see noise: the
    real test images score best, and worse as Gaussian noise grows."""
    unlabelled = dataclasses.replace(digits, train_y=None, test_y=None, label_names=None)
    features = train_feature_net(unlabelled, steps=300)
    assert features.info["kind"] == "autoencoder"
    assert features.info["test_reconstruction_r2"] > 0.5
    with pytest.raises(ValueError, match="autoencoder"):
        features.predict(data_units(digits, digits.test_x[:5]))
    reference = Reference.of(features(data_units(digits, digits.train_x)))
    test = data_units(digits, digits.test_x)
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(0))
    distances = [score_samples(features((test + level * noise).clamp(0, 1)), reference,
                               bootstrap=20)["frechet_distance"]["value"]
                 for level in (0.0, 0.1, 0.2, 0.4)]
    assert distances == sorted(distances) and distances[0] < distances[-1] / 3
