"""Pretrained DINOv2 features for sample quality (`--features dinov2:PATH`), on a tiny DINOv2
checkpoint written here with transformers (random weights, the released models' architecture
and file format): no download."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_tiny
from torch.nn import functional

from vaekit.cli import main
from vaekit.errors import ConfigError
from vaekit.pretrained_features import IMAGENET_MEAN, IMAGENET_STD, load_pretrained_features
from vaekit.runs import load_run, load_run_dataset
from vaekit.sample_quality import evaluate_sample_quality

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer DINOv2 of width 32 at 28 x 28 inputs (patch 14), saved as safetensors."""
    folder = tmp_path_factory.mktemp("dinov2")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64,
                                       image_size=28, patch_size=14)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(str(folder), safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("run") / "run", epochs=2)


def test_features_are_the_class_token_of_the_preprocessed_images(checkpoint, run_dir):
    """Grey 8x8 digits -> 3 channels, bicubic to the model's 28 x 28, ImageNet-normalised ->
    pooler_output: the same numbers as transformers' model called directly."""
    run = load_run(run_dir)
    dataset = load_run_dataset(run)
    features = load_pretrained_features(f"dinov2:{checkpoint}", dataset)
    images = dataset.test_x[:10].float() / 255  # (10, 1, 8, 8) in [0, 1]
    got = features(images)  # (10, 32)
    assert got.shape == (10, 32) and got.dtype == torch.float64
    model = transformers.Dinov2Model.from_pretrained(str(checkpoint)).eval()
    x = functional.interpolate(images.expand(-1, 3, -1, -1), size=(28, 28), mode="bicubic",
                               antialias=True, align_corners=False).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=x).pooler_output.double()
    assert torch.allclose(got, expected, atol=1e-5)
    assert features.info["dimensions"] == 32 and len(features.info["model_digest"]) == 64
    # different images give different features: the network is really applied
    assert not torch.allclose(got[0], got[1])


def test_sample_quality_in_dinov2_features(checkpoint, run_dir, tmp_path, monkeypatch):
    """The scores come out in the pretrained space, deterministically, with their floor; the
    reference cache goes to vaekit's cache (keyed by the checkpoint's digest), never into the
    checkpoint's folder."""
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    before = sorted(p.name for p in checkpoint.iterdir())
    run = load_run(run_dir)
    dataset = load_run_dataset(run)
    first = evaluate_sample_quality(run, dataset, samples=60, bootstrap=20,
                                    features_spec=f"dinov2:{checkpoint}")
    second = evaluate_sample_quality(run, dataset, samples=60, bootstrap=20,
                                     features_spec=f"dinov2:{checkpoint}")
    own = evaluate_sample_quality(run, dataset, samples=60, bootstrap=20)
    assert first["features"]["kind"] == "dinov2" and own["features"]["kind"] != "dinov2"
    for result in (first, second):
        result.pop("seconds")
    assert first == second
    assert first["scores"][0]["frechet_distance"] != own["scores"][0]["frechet_distance"]
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    references = list((tmp_path / "cache" / "features").glob("*-reference-*"))
    assert len(references) == 2  # one per feature space
    json.dumps(first, allow_nan=False)


def test_bad_feature_specs_are_refused(checkpoint, run_dir, tmp_path):
    dataset = load_run_dataset(load_run(run_dir))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((checkpoint / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    cases = [("inception:/x", "expected dinov2:PATH"), ("dinov2:", "expected dinov2:PATH"),
             (f"dinov2:{tmp_path / 'missing'}", "holds no config.json"),
             (f"dinov2:{pickled}", "never from a pickle")]
    for spec, words in cases:
        with pytest.raises(ConfigError, match=words):
            load_pretrained_features(spec, dataset)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="cannot load the DINOv2 checkpoint"):
        load_pretrained_features(f"dinov2:{broken}", dataset)


def test_the_command_takes_features_with_sample_quality_only(checkpoint, run_dir, capsys,
                                                             tmp_path, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    assert main(["evaluate", str(run_dir), "--k", "5", "--features",
                 f"dinov2:{checkpoint}"]) == 2
    assert "--features belongs to --sample-quality" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--k", "5", "--limit", "20", "--no-naive",
                 "--sample-quality", "--samples", "30", "--bootstrap", "10", "--features",
                 f"dinov2:{checkpoint}", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "features: dinov2 class token (32 features, images resized to 28)" in out
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["sample_quality"]["features"]["kind"] == "dinov2"
