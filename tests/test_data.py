"""Datasets and the pipeline from raw data to what the likelihood scores."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_fake_mnist, write_idx
from PIL import Image

from vaekit.data import (
    Pipeline,
    load_dataset,
    load_digits,
    read_idx,
    choose_likelihood,
    resolve_likelihood,
)
from vaekit.errors import DataError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_digits_is_built_in_with_a_seeded_split():
    data = load_digits()
    assert data.kind == "image8" and data.shape == (1, 8, 8)
    assert len(data.train_x) + len(data.test_x) == 1797
    assert data.train_x.dtype == torch.uint8 and int(data.train_x.max()) == 255
    assert data.train_y is not None and set(data.train_y.tolist()) == set(range(10))
    again = load_digits()
    assert torch.equal(again.test_x, data.test_x) and again.fingerprint() == data.fingerprint()
    other = load_digits(split_seed=1)
    assert not torch.equal(other.test_x, data.test_x)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_are_read_from_data_dir(tmp_path, gz):
    folder = write_fake_mnist(tmp_path / "m", n_train=20, n_test=7, gz=gz)
    data = load_dataset("mnist", data_dir=str(folder), download=False)
    assert data.train_x.shape == (20, 1, 28, 28) and data.test_x.shape == (7, 1, 28, 28)
    assert data.train_y.shape == (20,) and data.train_x.dtype == torch.uint8
    raw = read_idx(folder / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert np.array_equal(raw, data.train_x[:, 0].numpy())


def test_idx_search_order_prefers_data_dir_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    write_fake_mnist(tmp_path / "cache" / "mnist", n_train=11, n_test=3, seed=1)
    assert len(load_dataset("mnist", download=False).train_x) == 11
    folder = write_fake_mnist(tmp_path / "mine", n_train=13, n_test=3, seed=2)
    assert len(load_dataset("mnist", data_dir=str(folder), download=False).train_x) == 13


def test_idx_absent_offline_names_the_ways_to_provide_files(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("mnist", download=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-5], "truncated"),
    (lambda b: b"\x01\x02" + b[2:], "magic"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "unsigned bytes"),
    (lambda b: b[:6], "truncated"),
])
def test_damaged_idx_files_are_refused(tmp_path, damage, message):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((3, 4, 4), np.uint8))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_corrupt_gzip_is_refused(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00" * 100)[:-10])
    with pytest.raises(DataError, match="cannot read|magic"):
        read_idx(path)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist absent")
def test_fashion_mnist_from_debian_files():
    data = load_dataset("fashion-mnist", download=False)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.label_names[9] == "Ankle boot"
    assert np.bincount(data.test_y.numpy()).tolist() == [1000] * 10


def _save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        for i in range(5):
            _save_image(tmp_path / label / f"{i}.png", rng.integers(0, 256, (12, 10, 3), np.uint8))
    data = load_dataset(str(tmp_path), test_fraction=0.2)
    assert data.shape == (3, 12, 10) and data.label_names == ["cats", "dogs"]
    assert len(data.train_x) == 8 and len(data.test_x) == 2
    resized = load_dataset(str(tmp_path), image_size=6, channels=1)
    assert resized.shape == (1, 6, 6)


def test_image_folder_mixed_sizes_and_modes_need_options(tmp_path):
    _save_image(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _save_image(tmp_path / "b.png", np.zeros((9, 8), np.uint8))
    with pytest.raises(DataError, match="--image-size"):
        load_dataset(str(tmp_path))
    assert load_dataset(str(tmp_path), image_size=8).shape == (1, 8, 8)
    _save_image(tmp_path / "c.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="--channels"):
        load_dataset(str(tmp_path), image_size=8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_dataset(str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_dataset(str(tmp_path))


def test_numeric_arrays(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = load_dataset(str(tmp_path / "x.npy"))
    assert data.kind == "real" and data.shape == (3,) and len(data.train_x) == 40

    np.savez(tmp_path / "d.npz", x=x, y=np.arange(50) % 3, x_test=x[:5], y_test=np.arange(5) % 3)
    data = load_dataset(str(tmp_path / "d.npz"))
    assert len(data.train_x) == 50 and len(data.test_x) == 5 and data.test_y.tolist() == [0, 1, 2,
                                                                                         0, 1]
    images = np.random.default_rng(1).integers(0, 256, (10, 6, 6, 3), np.uint8)
    np.save(tmp_path / "img.npy", images)
    data = load_dataset(str(tmp_path / "img.npy"))
    assert data.kind == "image8" and data.shape == (3, 6, 6)

    (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n3,4.5,1\n5,6,1\n7,8,0\n")
    data = load_dataset(str(tmp_path / "t.csv"), test_fraction=0.25)
    assert data.shape == (2,) and data.label_names == ["0", "1"] and len(data.test_x) == 1


def test_csv_text_labels_become_class_names(tmp_path):
    rows = ["radius,texture,Diagnosis"] + [f"{i},{i * 2 + 0.5},{'malignant' if i % 3 else 'benign'}"
                                           for i in range(12)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    # "Diagnosis" is not a label column name: its text is refused, naming the names that are
    with pytest.raises(DataError, match="'Diagnosis'.*named one of label, labels, y, class"):
        load_dataset(str(tmp_path / "t.csv"))
    (tmp_path / "t.csv").write_text("\n".join(rows).replace("Diagnosis", "Label") + "\n")
    data = load_dataset(str(tmp_path / "t.csv"), test_fraction=0.25)
    assert data.label_names == ["benign", "malignant"]  # sorted names, classes 0 and 1
    assert data.feature_names == ["radius", "texture"] and data.shape == (2,)
    x = torch.cat([data.train_x, data.test_x])[:, 0]  # radius is the row number i
    y = torch.cat([data.train_y, data.test_y])
    assert torch.equal(y, torch.tensor([0 if int(i) % 3 == 0 else 1 for i in x]))
    assert data.info()["feature_names"] == ["radius", "texture"]


@pytest.mark.parametrize("column", ["label", "labels", "y", "class", "target", "TARGET"])
def test_csv_label_column_names(tmp_path, column):
    (tmp_path / "t.csv").write_text(f"a,{column}\n1,cat\n2,dog\n3,cat\n4,dog\n5,cat\n")
    data = load_dataset(str(tmp_path / "t.csv"))
    assert data.label_names == ["cat", "dog"] and data.shape == (1,)


def test_csv_empty_label_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("a,label\n1,cat\n2,\n3,dog\n")
    with pytest.raises(DataError, match="line 3 has an empty 'label'"):
        load_dataset(str(tmp_path / "t.csv"))


@pytest.mark.parametrize("content,message", [
    ("1,2\n3,x\n", "line 2, column 2"),
    ("1,2\n3\n", "line 2 has 1 columns"),
    ("", "empty"),
    ("1,nan\n2,3\n", "non-finite"),
])
def test_bad_csv(tmp_path, content, message):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / "bad.csv"))


def test_object_arrays_are_never_unpickled(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="never unpickles"):
        load_dataset(str(tmp_path / "obj.npy"))


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="digits, mnist, fashion-mnist"):
        load_dataset("cifar-11")


# --- the pipeline ---------------------------------------------------------------------------


def test_likelihood_auto_resolution(tmp_path):
    assert resolve_likelihood("auto", load_digits()) == "bernoulli"
    np.save(tmp_path / "r.npy", np.random.default_rng(0).normal(size=(20, 2)))
    assert resolve_likelihood("auto", load_dataset(str(tmp_path / "r.npy"))) == "gaussian"
    np.save(tmp_path / "u.npy", np.random.default_rng(0).random((20, 2)))
    assert resolve_likelihood("auto", load_dataset(str(tmp_path / "u.npy"))) == "bernoulli"


def _image_folder(folder: Path, pixels: np.ndarray) -> str:
    """pixels (N, H, W) grey or (N, H, W, 3) colour, uint8, written as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return str(folder)


def test_likelihood_auto_is_decided_from_the_images(tmp_path):
    rng = np.random.default_rng(0)
    # near-binary strokes: 0 or 255 with a few grey edge pixels -> binarised
    strokes = np.where(rng.random((20, 12, 12)) < 0.2, 255, 0).astype(np.uint8)
    strokes[:, 0, :3] = 128  # 2% of the pixels mid-grey
    chosen, why = choose_likelihood("auto", load_dataset(_image_folder(tmp_path / "s", strokes)))
    assert chosen == "bernoulli" and "near black or white" in why
    # a grey photo: levels spread over the range -> a likelihood for the 256 levels
    photo = rng.integers(0, 256, (20, 12, 12), dtype=np.uint8)
    chosen, why = choose_likelihood("auto", load_dataset(_image_folder(tmp_path / "p", photo)))
    assert chosen == "discretized-logistic" and "mid-tones" in why
    # colour images, even of only black and white pixels, are never binarised
    colour = np.repeat(strokes[..., None], 3, axis=-1)
    chosen, why = choose_likelihood("auto", load_dataset(_image_folder(tmp_path / "c", colour)))
    assert chosen == "discretized-logistic" and why.startswith("colour images")
    # the binarised benchmarks keep their binarisation; an explicit choice is kept as given
    assert choose_likelihood("auto", load_digits())[0] == "bernoulli"
    assert choose_likelihood("gaussian", load_digits()) == ("gaussian", "chosen with --likelihood")


def test_binarisation_is_bernoulli_in_the_grey_level():
    raw = torch.full((20_000, 1), 64, dtype=torch.uint8)  # p = 64 / 255
    pipeline = Pipeline("binarize", "image8", 0)
    x = pipeline.apply(raw, torch.rand(20_000, 1, generator=torch.Generator().manual_seed(0)))
    p = 64 / 255
    se = math.sqrt(p * (1 - p) / 20_000)
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert abs(x.mean().item() - p) < 4 * se


def test_fixed_evaluation_noise_does_not_depend_on_batching():
    data = load_digits()
    pipeline = Pipeline.build(data, "bernoulli", "dynamic", split_seed=0)
    whole = pipeline.fixed(data.test_x, 0)
    pieces = torch.cat([pipeline.fixed(data.test_x[i:i + 37], i)
                        for i in range(0, len(data.test_x), 37)])
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole, pipeline.fixed(data.test_x, 0, split="train"))


def test_dequantised_gaussian_reports_pixel_units(tmp_path):
    data = load_digits()
    pipeline = Pipeline.build(data, "gaussian", "dynamic", 0)
    assert pipeline.mode == "dequantize"
    assert math.isclose(pipeline.log_jacobian, -64 * math.log(256))
    x = pipeline.fixed(data.test_x[:5], 0)
    assert bool(((x >= 0) & (x < 1)).all())


def test_standardised_arrays_report_original_units(tmp_path):
    x = np.random.default_rng(0).normal(3.0, 5.0, size=(400, 2))
    np.save(tmp_path / "r.npy", x)
    data = load_dataset(str(tmp_path / "r.npy"))
    pipeline = Pipeline.build(data, "gaussian", "dynamic", 0)
    z = pipeline.fixed(data.train_x, 0, "train")
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5)
    assert math.isclose(pipeline.log_jacobian, -float(data.train_x.std(0).log().sum()),
                        rel_tol=1e-5)
    assert torch.allclose(pipeline.display(z), data.train_x, atol=1e-4)


def test_values_outside_the_likelihood_range_are_refused(tmp_path):
    np.save(tmp_path / "r.npy", np.linspace(-2, 2, 40).reshape(20, 2))
    data = load_dataset(str(tmp_path / "r.npy"))
    with pytest.raises(DataError, match=r"\[0, 1\].*--likelihood gaussian"):
        Pipeline.build(data, "bernoulli", "dynamic", 0)


def test_levels_pipeline_keeps_every_8_bit_value():
    data = load_digits()
    for likelihood in ("discretized-logistic", "logistic-mixture", "categorical"):
        pipeline = Pipeline.build(data, likelihood, "dynamic", 0)
        assert pipeline.mode == "levels" and not pipeline.noisy
        assert pipeline.log_jacobian == 0 and "log-probability of the 8-bit" in pipeline.description
        x = pipeline.fixed(data.test_x[:50], 0)
        assert torch.equal(x * 255, data.test_x[:50].float())  # exactly the levels k / 255
        assert torch.equal(pipeline.display(x), x)


def test_level_likelihoods_refuse_real_arrays(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((20, 3)).astype(np.float32))
    data = load_dataset(str(tmp_path / "x.npy"))
    with pytest.raises(DataError, match="8-bit images"):
        Pipeline.build(data, "categorical", "dynamic", 0)


def test_npz_with_a_test_split_names_its_classes(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((20, 4)), y=rng.integers(0, 3, 20),
             x_test=rng.random((6, 4)), y_test=np.array([0, 1, 2, 3, 1, 0]))
    data = load_dataset(str(tmp_path / "d.npz"))
    assert data.label_names == ["0", "1", "2", "3"]  # class 3 appears in the test split only


def test_perturbed_pixels_are_replaced_at_the_rate_and_alike_for_any_process_count():
    from vaekit.data import perturb_pixels
    from vaekit.randomness import seeded_generator

    raw = torch.full((64, 1, 28, 28), 7, dtype=torch.uint8)
    whole = perturb_pixels(raw, 0.2, seeded_generator(5), 64, slice(0, 64))
    share = (whole != 7).float().mean().item()
    # replaced pixels keep 7 with chance 1/256; binomial standard error over 50,176 pixels
    expected = 0.2 * 255 / 256
    assert abs(share - expected) < 4 * (expected * (1 - expected) / whole.numel()) ** 0.5
    halves = [perturb_pixels(raw[rows], 0.2, seeded_generator(5), 64, rows)
              for rows in (slice(0, 32), slice(32, 64))]
    assert torch.equal(torch.cat(halves), whole)
    levels = whole[whole != 7].float()
    assert levels.min() < 10 and levels.max() > 245  # uniform over 0..255
    bits = perturb_pixels(torch.ones(8, 1, 4, 4), 1.0, seeded_generator(1), 8, slice(0, 8))
    assert set(bits.unique().tolist()) == {0.0, 1.0}  # a fixed binarisation gets random bits
