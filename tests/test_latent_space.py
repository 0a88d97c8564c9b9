"""latent_space.py: paths between codes and LatentSpace on trained runs; then viz's pictures of
what LatentSpace computes (they need one to draw)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import train_tiny

from vaekit.data import Pipeline
from vaekit.errors import ConfigError
from vaekit.model import ModelConfig, build_vae
from vaekit.runs import load_run
from vaekit.latent_space import UNUSED_KL, LatentSpace, interpolation_path
from vaekit.viz import (
    cell_size,
    embedding_image,
    interpolation_image,
    manifold_image,
    single_image,
    traversal_image,
)


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs") / "uniform", prior="uniform")


@pytest.fixture(scope="module")
def plane_run(tmp_path_factory):
    """A 2-D latent space: the manifold map shows all of it."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "plane", latent_dim=2)


def space_of(run_dir) -> LatentSpace:
    return LatentSpace.of_run(load_run(run_dir))


# --- paths ---------------------------------------------------------------------------------------


def test_linear_path_is_evenly_spaced_with_exact_ends():
    start, end = torch.tensor([0.1, -2.0, 3.0]), torch.tensor([0.3, 1.0, -1.0])
    path = interpolation_path(start, end, 5, "linear")
    assert path.shape == (5, 3)
    assert torch.equal(path[0], start) and torch.equal(path[-1], end)
    torch.testing.assert_close(path[2], (start + end) / 2)
    steps = path.diff(dim=0)
    torch.testing.assert_close(steps, steps[:1].expand_as(steps))


def test_spherical_path_turns_at_a_constant_rate_and_keeps_the_norm_of_equal_codes():
    start = torch.tensor([2.0, 0.0, 0.0])
    end = torch.tensor([0.0, 0.0, 2.0])  # a quarter turn
    path = interpolation_path(start, end, 7, "spherical")
    assert torch.equal(path[0], start) and torch.equal(path[-1], end)
    torch.testing.assert_close(path.norm(dim=1), torch.full((7,), 2.0))
    angles = torch.atan2(path[:, 2], path[:, 0])
    torch.testing.assert_close(angles, torch.linspace(0, math.pi / 2, 7))
    # the straight line's midpoint has a smaller norm: codes a Gaussian prior rarely makes
    assert interpolation_path(start, end, 3, "linear")[1].norm() < 2 * 0.75


def test_spherical_path_falls_back_to_the_line_where_the_angle_is_undefined():
    start = torch.tensor([1.0, 1.0])
    for end in (3 * start, torch.zeros(2)):
        torch.testing.assert_close(interpolation_path(start, end, 4, "spherical"),
                                   interpolation_path(start, end, 4, "linear"))


def test_path_arguments_are_checked():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="linear, spherical"):
        interpolation_path(z, z, 3, "cubic")
    with pytest.raises(ConfigError):
        interpolation_path(z, z, 1, "linear")


# --- LatentSpace on trained runs -----------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_conv_run", "uniform_run"])
def test_interpolation_ends_decode_to_the_reconstructions(fixture, request):
    run = load_run(request.getfixturevalue(fixture))
    space = LatentSpace.of_run(run)
    interpolation = space.interpolation(5, 17, steps=6)
    expected_mode = "linear" if run.config.prior == "uniform" else "spherical"
    assert interpolation.mode == expected_mode
    with torch.inference_mode():
        x = torch.cat([run.pipeline.fixed(space.test_x[i:i + 1], i) for i in (5, 17)])
        reconstructions = run.pipeline.display(run.model.reconstruct(x))
    torch.testing.assert_close(interpolation.decoded[0], reconstructions[0])
    torch.testing.assert_close(interpolation.decoded[-1], reconstructions[1])
    torch.testing.assert_close(interpolation.inputs, x)
    assert not torch.equal(interpolation.decoded[0], interpolation.decoded[-1])
    if run.config.prior == "uniform":  # the straight line stays inside the unit cube
        assert bool(((interpolation.codes >= 0) & (interpolation.codes <= 1)).all())


def test_interpolation_refuses_a_path_that_leaves_the_prior(uniform_run, tiny_run):
    with pytest.raises(ConfigError, match="use linear"):
        space_of(uniform_run).interpolation(0, 1, mode="spherical")
    space = space_of(tiny_run)
    with pytest.raises(ConfigError, match="numbered 0 to"):
        space.interpolation(0, len(space.test_x))


def test_dimensions_are_ordered_by_kl_and_unused_ones_flagged(tiny_run):
    space = space_of(tiny_run)
    kl = space.kl_per_dimension
    assert kl.shape == (space.latent_dim,) and bool((kl >= 0).all())
    assert [kl[d] for d in space.dims_by_use] == sorted(kl.tolist(), reverse=True)
    assert space.unused == [value < UNUSED_KL for value in kl.tolist()]


@pytest.mark.parametrize("fixture", ["tiny_run", "uniform_run"])
def test_traversal_varies_one_dimension_per_row_over_the_prior_range(fixture, request):
    space = space_of(request.getfixturevalue(fixture))
    traversal = space.traversal(steps=5, width=2.0, base=3)
    assert traversal.dims == space.dims_by_use
    low, high = space.prior.range(2.0)
    torch.testing.assert_close(traversal.values, torch.linspace(low, high, 5))
    base = space.code_of(3).cpu()
    torch.testing.assert_close(traversal.base, base)
    for row, d in enumerate(traversal.dims):
        codes = base.repeat(5, 1)
        codes[:, d] = traversal.values
        torch.testing.assert_close(traversal.decoded[row], space.decode(codes).cpu())
    assert traversal.decoded.shape == (space.latent_dim, 5, *space.data_shape)


def test_traversal_of_chosen_dimensions_and_bad_choices(tiny_run):
    space = space_of(tiny_run)
    least, most = space.dims_by_use[-1], space.dims_by_use[0]
    assert space.traversal(dims=[least, most]).dims == [most, least]
    centre = space.traversal(dims=[most]).base
    assert torch.equal(centre, torch.zeros(space.latent_dim))
    for dims in ([space.latent_dim], [-1], [0, 0], []):
        with pytest.raises(ConfigError):
            space.traversal(dims=dims)
    with pytest.raises(ConfigError):
        space.traversal(width=0.0)


def test_manifold_of_a_2d_space_is_the_prior_quantile_grid(plane_run):
    space = space_of(plane_run)
    manifold = space.manifold(grid=4)
    assert manifold.dims == (0, 1)
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(4) + 0.5) / 4)
    torch.testing.assert_close(manifold.values, quantiles)
    # row 0 is the top: the highest value of the vertical dimension
    expected = space.decode(torch.stack([torch.stack([quantiles[c], quantiles[3 - r]])
                                         for r in range(4) for c in range(4)]))
    torch.testing.assert_close(manifold.decoded.reshape(16, *space.data_shape), expected.cpu())


def test_manifold_of_more_dimensions_is_the_plane_of_the_two_most_used(tiny_run, uniform_run):
    space = space_of(tiny_run)
    manifold = space.manifold(grid=3, base=2)
    assert manifold.dims == tuple(space.dims_by_use[:2])
    base = space.code_of(2).cpu()
    codes = base.repeat(3, 3, 1)
    codes[:, :, manifold.dims[0]] = manifold.values[None, :]
    codes[:, :, manifold.dims[1]] = manifold.values.flip(0)[:, None]
    torch.testing.assert_close(manifold.decoded, space.decode(codes).cpu())
    cube = space_of(uniform_run).manifold(grid=4)  # uniform prior: quantiles are u itself
    torch.testing.assert_close(cube.values, (torch.arange(4) + 0.5) / 4)


def test_manifold_needs_two_dimensions(tmp_path):
    run = train_tiny(tmp_path / "line", latent_dim=1, epochs=1)
    with pytest.raises(ConfigError, match="at least 2 latent dimensions"):
        space_of(run).manifold()


def test_embeddings_are_posterior_means_and_scales_with_pca(tiny_run):
    space = space_of(tiny_run)
    embedding = space.embeddings(batch_size=50)
    n = len(space.test_x)
    assert embedding.means.shape == embedding.scales.shape == (n, space.latent_dim)
    assert bool((embedding.scales > 0).all())
    torch.testing.assert_close(embedding.means[[0, 7, n - 1]],
                               space.codes(space.inputs([0, 7, n - 1])).cpu())
    assert torch.equal(embedding.labels, space.test_y)
    points, names, components = embedding.projection()
    assert points.shape == (n, 2) and names[0].startswith("PC1")
    torch.testing.assert_close(components @ components.T, torch.eye(2, dtype=torch.float64))
    # the first component carries at least as much variance as any other direction
    assert float(points[:, 0].var()) >= float(points[:, 1].var())
    centred = embedding.means.double() - embedding.means.double().mean(0)
    torch.testing.assert_close(points, centred @ components.T)


# --- pictures ------------------------------------------------------------------------------------


def distinct_colours(image) -> int:
    return len(np.unique(np.asarray(image).reshape(-1, 3), axis=0))


def test_pictures_of_image_data(tiny_run, plane_run):
    space = space_of(tiny_run)
    cell_h, cell_w = cell_size(space.data_shape)
    picture = interpolation_image(space.interpolation(0, 1, steps=4))
    assert picture.height == 44 + cell_h + 4 and picture.width >= 6 * (cell_w + 2) + 2
    picture = traversal_image(space.traversal(steps=5))
    assert picture.height == 44 + 20 + space.latent_dim * (cell_h + 4)
    picture = manifold_image(space_of(plane_run).manifold(grid=3))
    assert picture.height == 26 + 3 * (cell_h + 2) + 2 + 34
    chart = embedding_image(space.embeddings())
    assert chart.size == (820, 640)
    for image in (picture, chart):
        assert distinct_colours(image) > 10


def test_pictures_of_vector_data_use_heat_map_rows():
    torch.manual_seed(0)
    model = build_vae(ModelConfig(data_shape=(5,), latent_dim=3, hidden=[8],
                                  likelihood="gaussian")).eval()
    test_x = torch.randn(30, 5)
    pipeline = Pipeline("standardize", "real", 0, mean=torch.zeros(1, 5), std=torch.ones(1, 5))
    space = LatentSpace(model, pipeline, test_x)
    interpolation = space.interpolation(0, 1, steps=4)
    assert interpolation_image(interpolation).height == 44 + 6 * 10
    traversal = space.traversal(steps=4)
    assert traversal_image(traversal).height == 44 + 3 * (4 * 10 + 4)  # no value header
    assert manifold_image(space.manifold(grid=2)).height == 44 + 4 * 10
    assert embedding_image(space.embeddings()).size == (820, 640)
    row = single_image(torch.tensor([0.0, 1.0, 2.0]), limits=(0.0, 2.0))
    assert row.size == (30, 10)
    assert np.asarray(row)[0, 0].tolist() == [0, 0, 255] and np.asarray(row)[0, 29][0] == 255


def test_single_image_is_the_example_at_its_own_size():
    grey = single_image(torch.tensor([[[0.0, 0.5], [1.0, 2.0]]]))
    assert grey.mode == "L" and np.asarray(grey).tolist() == [[0, 128], [255, 255]]
    colour = single_image(torch.rand(3, 4, 6))
    assert colour.mode == "RGB" and colour.size == (6, 4)


def test_the_old_import_path_from_viz_keeps_working():
    import vaekit.viz as viz

    assert viz.LatentSpace is LatentSpace and viz.interpolation_path is interpolation_path
    with pytest.raises(AttributeError):
        viz.no_such_name  # noqa: B018
