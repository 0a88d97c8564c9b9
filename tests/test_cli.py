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


def _one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(vaekit_cli, tmp_path, tiny_run):
    _one_line_error(vaekit_cli("train", "--data", "cifar-11", "--out", tmp_path / "x"),
                    "unknown dataset", "digits, mnist, fashion-mnist")
    assert not (tmp_path / "x").exists()
    _one_line_error(vaekit_cli("train", "--prior", "cauchy"), "not a valid choice", "normal, uniform")
    _one_line_error(vaekit_cli("train", "--epochs", "-3"), "--epochs must be at least 1")
    _one_line_error(vaekit_cli("train", "--latent-dim", "two"), "--latent-dim takes an integer")
    _one_line_error(vaekit_cli("train", "--out", tiny_run), "already exists", "--resume")
    _one_line_error(vaekit_cli("sample", tmp_path / "nope"), "no such run folder")
    _one_line_error(vaekit_cli("sample", tiny_run, "--out", tmp_path / "s.jpg"), "must end in .png")
    _one_line_error(vaekit_cli("sample", tiny_run, "-n", "0"), "positive integer")


def test_version_and_fast_help(vaekit_cli):
    import subprocess
    import sys
    import time

    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c",
                             "import sys; from vaekit.cli import main; main(['--help']); "],
                            capture_output=True, text=True)
    assert "train" in result.stdout and time.perf_counter() - started < 5
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom vaekit import cli\n"
                            "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "False"  # the CLI imports torch only when a command runs
