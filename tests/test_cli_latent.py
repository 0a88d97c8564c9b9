"""The latent-space commands end to end: interpolate, traverse, manifold, embed (and explore's
missing-extra message) on tiny trained runs.

Most calls go through `vaekit.cli.main` in this process (the same parsing, library calls and
printing as the installed command, without paying for a Python start and a torch import each
time); one test runs the real `vaekit` executable.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import train_tiny
from PIL import Image

from vaekit.runs import load_run
from vaekit.latent_space import LatentSpace
from vaekit.viz import cell_size, image_grid


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs") / "uniform", prior="uniform")


def picture(path) -> np.ndarray:
    assert path.is_file(), path
    image = np.asarray(Image.open(path).convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # not a constant picture
    return image


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def vaekit(capsys):
    """Call the command line in this process: vaekit("traverse", run_dir, ...) -> Result."""
    from vaekit.cli import main

    def call(*args) -> Result:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def refused(result, words: str):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert words in result.stderr, result.stderr


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_conv_run", "uniform_run"])
def test_interpolate_shows_the_reconstructions_at_the_ends(fixture, request, vaekit,
                                                          tmp_path):
    run_dir = request.getfixturevalue(fixture)
    out = tmp_path / "path.png"
    result = ok(vaekit("interpolate", run_dir, "--from", 4, "--to", 9, "--steps", 5,
                           "--out", out))
    mode = "linear" if fixture == "uniform_run" else "spherical"
    assert f"{mode} path" in result.stdout
    image = picture(out)
    # the row under the title: input 4, the 5 decoded codes, input 9; the decoded ends must be
    # the reconstructions of examples 4 and 9, pixel for pixel
    run = load_run(run_dir)
    space = LatentSpace.of_run(run)
    with torch.inference_mode():
        x = torch.cat([run.pipeline.fixed(space.test_x[i:i + 1], i) for i in (4, 9)])
        ends = run.pipeline.display(run.model.reconstruct(x))
    expected = np.asarray(image_grid(torch.cat([x[:1], ends[:1], ends[1:] * 0, ends[1:] * 0,
                                                ends[1:] * 0, ends[1:], x[1:]]), columns=7))
    row = image[44:]
    cell_h, cell_w = cell_size(space.data_shape)
    assert row.shape[0] == expected.shape[0] == cell_h + 4
    for column in (0, 1, 5, 6):
        left = 2 + column * (cell_w + 2)
        assert np.array_equal(row[:, left:left + cell_w], expected[:, left:left + cell_w]), column


def test_interpolate_random_pairs_and_bad_requests(tiny_run, uniform_run, vaekit, tmp_path):
    result = ok(vaekit("interpolate", tiny_run, "--random", "--seed", 3, "--mode", "linear",
                           "--out", tmp_path / "r.png"))
    assert "linear path" in result.stdout
    picture(tmp_path / "r.png")
    refused(vaekit("interpolate", tiny_run, "--random", "--from", 1), "--random")
    refused(vaekit("interpolate", tiny_run, "--from", 100000), "numbered 0 to")
    refused(vaekit("interpolate", uniform_run, "--mode", "spherical"), "use linear")
    refused(vaekit("interpolate", tiny_run, "--steps", 1), "at least 2 steps")
    refused(vaekit("interpolate", tiny_run, "--out", tmp_path / "x.jpg"), ".png")
    assert not (tmp_path / "x.jpg").exists()


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_conv_run", "uniform_run"])
def test_traverse_has_one_row_per_dimension_by_use(fixture, request, vaekit, tmp_path):
    run_dir = request.getfixturevalue(fixture)
    result = ok(vaekit("traverse", run_dir, "--steps", 7, "--range", 2.5))
    image = picture(run_dir / "traversal.png")
    space = LatentSpace.of_run(load_run(run_dir))
    cell_h, cell_w = cell_size(space.data_shape)
    assert image.shape[0] == 44 + 20 + space.latent_dim * (cell_h + 4)
    assert image.shape[1] >= 7 * (cell_w + 2)
    order = [f"z{d}" for d in space.dims_by_use]
    printed = [part.split()[0] for part in result.stdout.split(": ", 1)[1].split(", ")]
    assert printed == order
    (run_dir / "traversal.png").unlink()  # the fixture is shared: leave it as it was


def test_traverse_chosen_dimensions_and_bad_ones(tiny_run, vaekit, tmp_path):
    out = tmp_path / "t.png"
    ok(vaekit("traverse", tiny_run, "--dims", "1,0", "--base", "5", "--out", out))
    assert picture(out).shape[0] == 44 + 20 + 2 * (cell_size((1, 8, 8))[0] + 4)
    refused(vaekit("traverse", tiny_run, "--dims", "9"), "numbered 0 to 3")
    refused(vaekit("traverse", tiny_run, "--base", "99999"), "numbered 0 to")
    assert vaekit("traverse", tiny_run, "--range", "-1").returncode == 2


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_conv_run", "uniform_run"])
def test_manifold_grid(fixture, request, vaekit, tmp_path):
    run_dir = request.getfixturevalue(fixture)
    out = tmp_path / "m.png"
    result = ok(vaekit("manifold", run_dir, "--grid", 6, "--out", out))
    space = LatentSpace.of_run(load_run(run_dir))
    first, second = space.dims_by_use[:2]
    assert f"plane of z{first} and z{second}" in result.stdout
    cell_h, _ = cell_size(space.data_shape)
    assert picture(out).shape[0] == 44 + 6 * (cell_h + 2) + 2 + 34


def test_manifold_of_a_2d_run(vaekit, tmp_path):
    run_dir = train_tiny(tmp_path / "plane", latent_dim=2, epochs=2)
    result = ok(vaekit("manifold", run_dir, "--grid", 5))
    assert "whole 2-D latent space" in result.stdout
    assert picture(run_dir / "manifold.png").shape[0] == 26 + 5 * (56 + 2) + 2 + 34


@pytest.mark.parametrize("fixture", ["tiny_run", "uniform_run"])
def test_embed_writes_the_scatter_and_the_arrays(fixture, request, vaekit, tmp_path):
    run_dir = request.getfixturevalue(fixture)
    out, arrays = tmp_path / "e.png", tmp_path / "e.npz"
    result = ok(vaekit("embed", run_dir, "--out", out, "--npz", arrays))
    assert picture(out).shape == (640, 820, 3)
    space = LatentSpace.of_run(load_run(run_dir))
    with np.load(arrays, allow_pickle=False) as saved:
        means, scales, labels = saved["means"], saved["scales"], saved["labels"]
        names, projection = saved["label_names"], saved["projection"]
    n, dims = len(space.test_x), space.latent_dim
    assert means.shape == scales.shape == (n, dims) and (scales > 0).all()
    assert np.array_equal(labels, space.test_y.numpy())
    assert names.tolist() == space.label_names
    np.testing.assert_allclose(means[:3], space.codes(space.inputs([0, 1, 2])).numpy(),
                               rtol=1e-5, atol=1e-6)
    if dims > 2:
        assert projection.shape == (2, dims) and "PC1" in result.stdout
    else:
        assert "axes: z0, z1" in result.stdout
    if fixture == "uniform_run":
        assert ((means >= 0) & (means <= 1)).all()


def test_explore_without_the_extra_says_how_to_install_it(tiny_run, monkeypatch, capsys):
    from vaekit.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["explore", str(tiny_run)]) == 2
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0
    assert "pip install 'vaekit[explore]'" in error


def test_the_installed_command(tiny_conv_run, vaekit_cli, tmp_path):
    result = vaekit_cli("--help")
    assert result.returncode == 0
    for command in ("interpolate", "traverse", "manifold", "embed", "explore"):
        assert command in result.stdout
    out = tmp_path / "m.png"
    result = vaekit_cli("manifold", tiny_conv_run, "--grid", 4, "--out", out)
    assert result.returncode == 0, result.stderr
    picture(out)
    result = vaekit_cli("traverse", tiny_conv_run, "--dims", "7")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("vaekit traverse: error: latent dimension 7 does not exist")


def test_traverse_and_manifold_of_a_chosen_group_of_a_hierarchy(vaekit, tmp_path):
    """--group z2 steers the bottom group of a two-group hierarchy (its 3 dimensions, one row
    each), the groups above at a test example's posterior means or at their prior means; a
    flat run or an unknown group is refused in one line."""
    run_dir = train_tiny(tmp_path / "hierarchy", latent_groups=[2, 3], latent_dim=5,
                         hidden=[32], epochs=3)
    cell_h, _ = cell_size((1, 8, 8))
    lower = tmp_path / "lower.png"
    result = ok(vaekit("traverse", run_dir, "--group", "z2", "--base", 4, "--out", lower))
    assert "of group z2, the groups above at test example 4's posterior means" in result.stdout
    assert picture(lower).shape[0] == 44 + 20 + 3 * (cell_h + 4)
    top = tmp_path / "top.png"
    ok(vaekit("traverse", run_dir, "--base", 4, "--out", top))
    assert picture(top).shape[0] == 44 + 20 + 2 * (cell_h + 4)  # z1: 2 dimensions
    result = ok(vaekit("manifold", run_dir, "--group", "z2", "--grid", 4, "--out",
                       tmp_path / "m.png"))
    assert "of group z2, the groups above at their prior means" in result.stdout
    picture(tmp_path / "m.png")
    refused(vaekit("traverse", run_dir, "--group", "z3"), "groups are z1, z2")
    refused(vaekit("manifold", run_dir, "--group", "z2", "--base", 99999), "numbered 0 to")
    flat = train_tiny(tmp_path / "flat", epochs=1)
    refused(vaekit("traverse", flat, "--group", "z1"), "one latent group")
