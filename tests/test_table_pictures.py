"""Pictures of tabular data: per-feature standardised colours, feature names, a colour bar."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaekit.data import Pipeline
from vaekit.dataset import Dataset
from vaekit.table_pictures import ANCHORS, CELL, FeatureScale, colours, feature_scale, table_image
from vaekit.viz import examples_image, reconstruction_image


def _table(n: int = 40) -> Dataset:
    """Two features on scales a thousand times apart (breast cancer's area and smoothness)."""
    generator = torch.Generator().manual_seed(0)
    area = 650.0 + 350.0 * torch.randn(n, generator=generator)
    smoothness = 0.1 + 0.014 * torch.randn(n, generator=generator)
    x = torch.stack([area, smoothness], 1)  # (n, 2)
    return Dataset("t.csv", "real", x[:30], x[30:], feature_names=["mean area",
                                                                   "mean smoothness"])


def test_features_are_standardised_by_the_training_statistics():
    dataset = _table()
    pipeline = Pipeline.build(dataset, "gaussian", "dynamic", 0)
    scale = feature_scale(dataset.shape, dataset.feature_names, pipeline)
    assert scale.names == ["mean area", "mean smoothness"] and scale.standardised
    # one standard deviation above the mean is +1 in both columns, whatever their units
    mean, std = dataset.train_x.mean(0), dataset.train_x.std(0)
    values = scale.values((mean + std)[None])  # (1, 2)
    np.testing.assert_allclose(values, [[1.0, 1.0]], rtol=1e-4)
    # the same z-score gives the same colour in either column; the mean is the map's white
    rgb = colours(scale.values(torch.stack([mean, mean + 2 * std])), scale.limits)  # (2, 2, 3)
    assert (rgb[0] == ANCHORS[2]).all() and (rgb[1, 0] == rgb[1, 1]).all()
    assert rgb[1, 0, 0] > rgb[1, 0, 2]  # above the mean: red


def test_unstandardised_runs_and_images():
    dataset = _table()
    names = feature_scale(dataset.shape, None, Pipeline("identity", "real", 0))
    assert names.names == ["x0", "x1"] and not names.standardised and names.limits == (0, 1)
    assert feature_scale((1, 8, 8), None, None) is None  # images keep their own pictures


def test_table_image_draws_names_blocks_and_bar():
    dataset = _table()
    scale = feature_scale(dataset.shape, dataset.feature_names,
                          Pipeline.build(dataset, "gaussian", "dynamic", 0))
    x = dataset.test_x  # (10, 2)
    one = examples_image(x, features=scale)
    pairs = reconstruction_image(x, x, columns=5, features=scale)  # 2 blocks of inputs + recons
    assert pairs.height == one.height + x.shape[0] * CELL + 3 * 5  # rows + gaps between blocks
    longer = table_image([x], FeatureScale(["a much longer feature name", "b"], scale.mean,
                                           scale.std))
    assert longer.height > one.height  # the names stand above the columns
    # the value cells: row i, column j has the colour of its z-score
    pixels = np.asarray(one)
    top = one.height - 62 - len(x) * CELL
    expected = colours(scale.values(x), scale.limits)  # (10, 2, 3)
    for i in range(len(x)):
        for j in range(2):
            cell = pixels[top + i * CELL + CELL // 2, 4 + j * CELL + CELL // 2]
            assert (cell == expected[i, j]).all()


def test_breast_cancer_columns_all_carry_their_variation(tmp_path):
    """scikit-learn's breast-cancer table as a CSV with text labels: on one colour map over raw
    values the two area columns (hundreds) leave the other 28 one colour; standardised, every
    column spans the map."""
    import csv

    datasets = pytest.importorskip("sklearn.datasets")
    from vaekit.data import load_dataset
    from vaekit.viz import vector_rows

    table = datasets.load_breast_cancer()
    with open(tmp_path / "bc.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*table.feature_names, "label"])
        for row, target in zip(table.data, table.target):
            writer.writerow([*map(float, row), table.target_names[target]])
    dataset = load_dataset(str(tmp_path / "bc.csv"))
    assert dataset.label_names == ["benign", "malignant"] and dataset.shape == (30,)
    assert dataset.feature_names == list(table.feature_names)
    pipeline = Pipeline.build(dataset, "gaussian", "dynamic", 0)
    scale = feature_scale(dataset.shape, dataset.feature_names, pipeline)
    x = dataset.test_x  # (114, 30)
    raw = np.asarray(vector_rows(x, cell=1)).astype(float)  # (114, 30, 3)
    flat_raw = (raw.std(0).max(-1) < 8).sum()  # columns whose colour barely changes
    shown = colours(scale.values(x), scale.limits).astype(float)  # (114, 30, 3)
    flat_shown = (shown.std(0).max(-1) < 8).sum()
    assert flat_raw >= 25 and flat_shown == 0
    picture = examples_image(x, features=scale)
    assert picture.width >= 30 * CELL
