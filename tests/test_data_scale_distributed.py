"""torchrun on an image folder mapped from the cache: one process decodes while the other waits,
both read the same memory map, and the run equals one process training from memory."""

from __future__ import annotations

import json

from test_data_cache import write_images
from test_distributed import SMALL, max_difference, torchrun, weights

from vaekit.config import TrainConfig
from vaekit.train import train


def test_two_processes_on_the_map_train_like_one_in_memory(tmp_path):
    write_images(tmp_path / "images", 96, classes=2)
    cache = {"VAEKIT_CACHE": str(tmp_path / "cache")}
    options = ["--data", tmp_path / "images", "--image-size", "8", "--epochs", "1",
               "--batch-size", "16", "--data-memory", "0", "--seed", "2"]
    result = torchrun("train", *options, "--out", tmp_path / "two", *SMALL, env=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory-mapped" in result.stdout and "x 2 processes" in result.stdout
    builds = list((tmp_path / "cache" / "arrays").glob("*/meta.json"))
    assert len(builds) == 1  # one cache, decoded once for both processes

    one = train(TrainConfig(data=str(tmp_path / "images"), image_size=8, epochs=1,
                            batch_size=16, seed=2, hidden=[32], latent_dim=3, progress=False,
                            checkpoint_every_minutes=60.0, out=str(tmp_path / "one")),
                log=lambda *a, **k: None)
    assert max_difference(weights(tmp_path / "two"), weights(one)) < 1e-6
    two_data = json.loads((tmp_path / "two" / "config.json").read_text())["data"]
    one_data = json.loads((one / "config.json").read_text())["data"]
    assert two_data["fingerprint"] == one_data["fingerprint"]
