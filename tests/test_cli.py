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


def write_colour_folder(folder, per_class: int = 60, seed: int = 0):
    """RGB images 12 x 16 in three class sub-folders; each class lights its own region in its
    own colour: red the top left, green the top right, blue the bottom half."""
    import numpy as np

    rng = np.random.default_rng(seed)
    regions = {"red": (0, slice(0, 6), slice(0, 8)), "green": (1, slice(0, 6), slice(8, 16)),
               "blue": (2, slice(6, 12), slice(0, 16))}
    for name, (channel, rows, cols) in regions.items():
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            image = rng.integers(0, 40, size=(12, 16, 3)).astype(np.uint8)
            image[rows, cols, channel] = rng.integers(180, 256)
            Image.fromarray(image).save(folder / name / f"{index}.png")
    return regions


def test_conditional_rgb_folder_end_to_end(vaekit_cli, tmp_path):
    """An RGB image folder with class sub-folders: train a conditional conv VAE with the
    logistic mixture, then draw each class by name or index and check it is that class."""
    import numpy as np
    import torch

    regions = write_colour_folder(tmp_path / "colours")
    run = tmp_path / "run"
    result = vaekit_cli("train", "--data", tmp_path / "colours", "--net", "conv",
                        "--likelihood", "logistic-mixture", "--likelihood-components", "2",
                        "--conditional", "--epochs", "20", "--batch-size", "16", "--latent-dim",
                        "2", "--hidden", "32", "--lr", "0.003", "--no-progress", "--out", run)
    assert result.returncode == 0, result.stderr
    assert "conditional on 3 classes" in result.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"] and "test_bits_per_dim" in rows[-1]

    def brightest_region(samples):  # samples (n, 3, 12, 16) in [0, 1]
        brightness = {name: float(samples[:, channel, rows, cols].mean())
                      for name, (channel, rows, cols) in regions.items()}
        return max(brightness, key=brightness.get)

    # by index on the command line (classes follow the sorted sub-folder names) ...
    result = vaekit_cli("sample", run, "--label", "1", "-n", "8", "--out", tmp_path / "g.png",
                        "--save-array", tmp_path / "g.npy")
    assert result.returncode == 0 and "y = green (class 1)" in result.stdout
    assert brightest_region(np.load(tmp_path / "g.npy")) == "green"
    # ... and every class through the Python API
    from vaekit.runs import load_run

    loaded = load_run(run)
    assert loaded.label_names == ["blue", "green", "red"]
    # 64 seeded draws: a 2-d latent this small may also carry some of the class, so a single
    # draw can look like another class (about 1 in 5 at worst across training seeds); the
    # average over 64 is that class with a margin of 0.2 in brightness
    torch.manual_seed(0)
    for label, name in enumerate(loaded.label_names):
        with torch.no_grad():
            samples = loaded.pipeline.display(loaded.model.sample(64, label, mean=True))
        assert brightest_region(samples.numpy()) == name

    result = vaekit_cli("sample", run, "--per-class", "5", "--out", tmp_path / "grid.png")
    assert result.returncode == 0 and "one row per class (3 classes)" in result.stdout
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height < grid.width and grid.mode == "RGB"
    result = vaekit_cli("reconstruct", run, "-n", "6", "--out", tmp_path / "rec.png")
    assert result.returncode == 0, result.stderr
    result = vaekit_cli("sample", run, "--label", "purple")
    assert result.returncode == 2 and "blue, green, red" in result.stderr
    assert "Traceback" not in result.stderr
    result = vaekit_cli("sample", run, "--label", "red", "--out", tmp_path / "r.png")
    assert result.returncode == 0 and "y = red (class 2)" in result.stdout


def test_label_needs_a_conditional_run_and_labelled_data(vaekit_cli, tmp_path, tiny_run):
    import numpy as np

    result = vaekit_cli("sample", tiny_run, "--label", "3")
    assert result.returncode == 2 and "not a conditional run" in result.stderr
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 3)).astype(np.float32))
    result = vaekit_cli("train", "--data", tmp_path / "x.npy", "--conditional", "--epochs", "1",
                        "--out", tmp_path / "run", "--no-progress")
    assert result.returncode == 2 and "no class labels" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_model_family_options_from_the_command_line(vaekit_cli, tmp_path):
    run = tmp_path / "run"
    result = vaekit_cli("train", "--out", run, "--epochs", "2", "--hidden", "32", "--latent-dim",
                        "3", "--no-progress", "--prior", "vamp", "--prior-components", "20",
                        "--objective", "iwae", "--iwae-samples", "4")
    assert result.returncode == 0, result.stderr
    assert "IWAE bound, k = 4" in result.stdout
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["prior"] == "vamp" and config["objective"] == "iwae"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("test_iwae" in r for r in rows)
    result = vaekit_cli("train", "--out", tmp_path / "bad", "--objective", "iwae",
                        "--kl-schedule", "linear")
    assert result.returncode == 2 and "--kl-schedule" in result.stderr


def test_conditional_runs_are_evaluated_and_refused_by_latent_steering(vaekit_cli, tmp_path):
    run = tmp_path / "cond"
    result = vaekit_cli("train", "--out", run, "--epochs", "1", "--hidden", "16", "--latent-dim",
                        "2", "--conditional", "--no-progress")
    assert result.returncode == 0, result.stderr
    result = vaekit_cli("evaluate", run, "--k", "10", "--limit", "20")
    assert result.returncode == 0 and "log p(x | y)" in result.stdout, result.stderr
    for command in ("traverse", "explain"):
        result = vaekit_cli(command, run)
        assert result.returncode == 2 and "is conditional" in result.stderr, command
        assert len(result.stderr.strip().splitlines()) == 1


def test_prefixes_of_options_are_refused_with_a_suggestion(tmp_path, capsys):
    """--epoch must not silently mean --epochs; a misspelt option gets the closest real one."""
    import pytest

    from vaekit.cli import build_parser

    parser = build_parser()
    for argv, suggestion in ((["train", "--epoch", "3"], "did you mean --epochs?"),
                             (["train", "--latent", "3"], "did you mean --latent-dim?"),
                             (["train", "--lr-decy=0.9"], "did you mean --lr-decay?"),
                             (["sample", str(tmp_path), "--seeds", "3"], "did you mean --seed?"),
                             (["sample", str(tmp_path), "--zzz", "3"], None)):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert (suggestion in error) if suggestion else ("did you mean" not in error)
    # the messages, through the real command
    from conftest import run_vaekit

    result = run_vaekit("train", "--epoch", "3", "--out", tmp_path / "run")
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.strip().splitlines() == [
        "vaekit: error: unrecognized arguments: --epoch 3; did you mean --epochs? (see vaekit "
        "--help)"]
    result = run_vaekit("sample", tmp_path, "--zzz", "3")
    assert result.returncode == 2 and "did you mean" not in result.stderr


def test_class_labels_match_without_case():
    import pytest

    from vaekit.cli import resolve_label
    from vaekit.errors import VaekitError

    names = ["Sandal", "shirt", "Bag", "bag2"]
    assert resolve_label("sandal", names) == 0 and resolve_label("SHIRT", names) == 1
    assert resolve_label("Bag", names) == 2 and resolve_label("3", names) == 3
    with pytest.raises(VaekitError, match="not a class of this run"):
        resolve_label("boot", names)
    assert resolve_label("a", ["a", "A"]) == 0  # exact match first
    with pytest.raises(VaekitError):
        resolve_label("b", ["B", "b "] + ["B"])  # two names fold to "b": ambiguous, refused
