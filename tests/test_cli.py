"""The `vaekit` command end to end, as a user runs it."""

from __future__ import annotations

import json

from PIL import Image


def test_help_lists_commands(vaekit_cli):
    result = vaekit_cli("--help")
    assert result.returncode == 0
    for command in ("train", "sample", "reconstruct"):
        assert command in result.stdout


def test_train_sample_reconstruct_end_to_end(vaekit_cli, tmp_path):
    run = tmp_path / "run"
    result = vaekit_cli("train", "--out", run, "--epochs", "2", "--hidden", "32",
                        "--latent-dim", "3", "--no-progress")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "samples.png",
                 "reconstructions.png", "curves.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_elbo", "test_elbo", "test_reconstruction", "test_kl", "train_seconds",
                "images_per_second"):
        assert all(key in r for r in rows), key
    assert all(r["test_elbo"] < 0 for r in rows)  # a log-probability of binary pixels

    result = vaekit_cli("sample", run, "-n", "9", "--out", tmp_path / "s.png")
    assert result.returncode == 0, result.stderr
    image = Image.open(tmp_path / "s.png")
    assert image.size[0] > 8 and len(set(image.convert("L").tobytes())) > 2  # not a constant picture

    result = vaekit_cli("reconstruct", run, "-n", "8", "--out", tmp_path / "r.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.png").is_file()
