"""Property-based tests of the data loaders (src/vaekit/data.py): arrays, CSV, IDX, image folders.

Two kinds of property: whatever bytes a file holds, a loader returns a dataset or raises
DataError (never another exception); and data that are valid come back exactly as written.
"""

from __future__ import annotations

import gzip
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from conftest import write_idx
from vaekit.data import GREY_MODES, load_array_file, read_idx, read_image_folder
from vaekit.errors import DataError

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def sorted_rows(array: np.ndarray) -> list[bytes]:
    return sorted(row.tobytes() for row in np.ascontiguousarray(array))


def loads_or_refuses(load):
    """Run a loader: its result, or None if it raised DataError (any other error fails)."""
    try:
        return load()
    except DataError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return None


# --- IDX ----------------------------------------------------------------------------------------

idx_arrays = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1,
                                                   max_side=12))


@FAST
@given(array=idx_arrays, gz=st.booleans())
def test_idx_round_trip(array, gz):
    with tempfile.TemporaryDirectory() as folder:
        path = write_idx(Path(folder) / ("f.gz" if gz else "f"), array, gz=gz)
        np.testing.assert_array_equal(read_idx(path), array)


@FAST
@given(array=idx_arrays, data=st.data())
def test_idx_truncated_anywhere_is_refused(array, data):
    with tempfile.TemporaryDirectory() as folder:
        whole = write_idx(Path(folder) / "f", array).read_bytes()
        cut = data.draw(st.integers(0, len(whole) - 1))
        (Path(folder) / "f").write_bytes(whole[:cut])
        assert loads_or_refuses(lambda: read_idx(Path(folder) / "f")) is None


@FAST
@given(raw=st.one_of(st.binary(max_size=300),
                     st.binary(max_size=300).map(lambda b: b"\x00\x00\x08" + b)),
       gz=st.booleans())
def test_idx_arbitrary_bytes_load_or_are_refused(raw, gz):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("f.gz" if gz else "f")
        path.write_bytes(gzip.compress(raw) if gz and len(raw) % 2 else raw)
        array = loads_or_refuses(lambda: read_idx(path))
        if array is not None:  # then the header described the data exactly
            assert array.dtype == np.uint8 and 4 + 4 * array.ndim + array.size == len(
                gzip.decompress(path.read_bytes()) if gz else raw)


# --- .npy / .npz --------------------------------------------------------------------------------

numeric_arrays = hnp.arrays(
    st.sampled_from([np.uint8, np.int16, np.int64, np.float32, np.float64, np.bool_]),
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
    elements={"allow_subnormal": False})


@FAST
@given(array=numeric_arrays)
def test_npy_arrays_load_exactly_or_are_refused(array):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.npy"
        np.save(path, array)
        dataset = loads_or_refuses(lambda: load_array_file(path, 0.2, 0))
    valid = array.ndim >= 2 and array.shape[0] >= 2 and array.size > 0
    finite = array.dtype.kind in "biu" or bool(np.isfinite(array).all())
    # held as float32: finite float64 values beyond its range must be refused, not become inf
    finite = finite and bool((np.abs(array.astype(np.float64)) <= np.finfo(np.float32).max).all())
    image = array.dtype == np.uint8 and array.ndim in (3, 4)
    if image and array.ndim == 4 and array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # NHWC is read as NCHW
    elif image and array.ndim == 4 and array.shape[1] not in (1, 3):
        valid = False  # neither layout has 1 or 3 channels
    if not (valid and finite):
        assert dataset is None
        return
    assert dataset is not None
    assert dataset.kind == ("image8" if image else "real")
    assert len(dataset.train_x) + len(dataset.test_x) == len(array) and len(dataset.test_x) >= 1
    expected = array[:, None] if image and array.ndim == 3 else array
    expected = expected if image else expected.astype(np.float64).astype(np.float32)
    together = np.concatenate([dataset.train_x.numpy(), dataset.test_x.numpy()])
    assert sorted_rows(together) == sorted_rows(expected)


@FAST
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(2, 8), st.integers(1, 4)),
                    elements=st.floats(-1e6, 1e6, width=32)),
       labels=st.booleans(), test_split=st.booleans())
def test_npz_keeps_its_arrays_and_labels(x, labels, test_split):
    y = np.arange(len(x)) % 3
    arrays = {"x": x, **({"y": y} if labels else {})}
    if test_split:
        arrays.update(x_test=x[:2] + 1, **({"y_test": y[:2]} if labels else {}))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.npz"
        np.savez(path, **arrays)
        dataset = load_array_file(path, 0.2, 0)
    if test_split:
        np.testing.assert_array_equal(dataset.train_x.numpy(), x)
        np.testing.assert_array_equal(dataset.test_x.numpy(), x[:2] + 1)
    else:
        together = np.concatenate([dataset.train_x.numpy(), dataset.test_x.numpy()])
        assert sorted_rows(together) == sorted_rows(x)
    assert (dataset.train_y is not None) == labels
    if labels and not test_split:  # every row keeps its own label through the split
        pairs = {(row.tobytes(), int(label)) for row, label in zip(x, y)}
        for split_x, split_y in ((dataset.train_x, dataset.train_y),
                                 (dataset.test_x, dataset.test_y)):
            assert {(r.numpy().tobytes(), int(l)) for r, l in zip(split_x, split_y)} <= pairs


@FAST
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".npy", ".npz"]))
def test_arbitrary_bytes_as_arrays_are_refused(raw, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x{suffix}"
        path.write_bytes(raw)
        loads_or_refuses(lambda: load_array_file(path, 0.2, 0))


# --- CSV ----------------------------------------------------------------------------------------

finite = st.floats(-1e9, 1e9, allow_nan=False, allow_subnormal=False)


@FAST
@given(table=st.integers(1, 5).flatmap(lambda m: st.lists(st.lists(finite, min_size=m,
                                                                    max_size=m), min_size=2,
                                                           max_size=12)),
       header=st.booleans(), label=st.booleans())
def test_csv_tables_load_exactly(table, header, label):
    values = np.array(table)  # (n, m)
    n, m = values.shape
    names = [f"f{j}" for j in range(m)]
    labels = np.arange(n) % 4
    lines = [",".join(names + ["label"] if label else names)] if header or label else []
    for row, y in zip(values, labels):
        lines.append(",".join([repr(float(v)) for v in row] + ([str(y)] if label else [])))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.csv"
        path.write_text("\n".join(lines) + "\n")
        dataset = load_array_file(path, 0.2, 0)
    assert dataset.kind == "real" and dataset.shape == (m,)
    together = np.concatenate([dataset.train_x.numpy(), dataset.test_x.numpy()])
    assert sorted_rows(together) == sorted_rows(values.astype(np.float32))
    if label:
        got = np.concatenate([dataset.train_y.numpy(), dataset.test_y.numpy()])
        assert sorted(got.tolist()) == sorted(labels.tolist())


@FAST
@given(text=st.text(alphabet=st.sampled_from(list("0123456789.,-+eE naifNAIF\n\"';x")),
                    max_size=200))
def test_arbitrary_csv_text_loads_or_is_refused(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.csv"
        path.write_text(text)
        dataset = loads_or_refuses(lambda: load_array_file(path, 0.2, 0))
        if dataset is not None:
            assert bool(np.isfinite(dataset.train_x.numpy()).all())


# --- image folders ------------------------------------------------------------------------------

image_specs = st.lists(st.tuples(st.sampled_from(["L", "RGB", "LA", "RGBA", "P", "1"]),
                                 st.integers(1, 6), st.integers(1, 6),
                                 st.sampled_from(["png", "bmp", "gif", "tiff"]),
                                 st.integers(0, 2**16)),
                       min_size=1, max_size=5)


@FAST
@given(specs=image_specs)
def test_image_folders_load_or_name_what_differs(specs):
    with tempfile.TemporaryDirectory() as folder:
        paths, saved = [], []
        for i, (mode, width, height, kind, seed) in enumerate(specs):
            rng = np.random.default_rng(seed)
            picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            path = Path(folder) / f"{i}.{kind}"
            try:
                picture.convert(mode).save(path)
            except OSError:  # this format cannot hold this mode
                assume(False)
            paths.append(path)
            with Image.open(path) as reopened:  # what a reader of the file sees
                reopened.load()
                saved.append(reopened.copy())
        grey = {image.mode in GREY_MODES for image in saved}
        sizes = {image.size for image in saved}
        try:
            x, y, names = read_image_folder(Path(folder), None, None)
        except DataError as exc:
            assert len(grey) > 1 or len(sizes) > 1, exc
            assert ("mixes greyscale and colour" in str(exc)) == (len(grey) > 1)
            return
    assert len(grey) == 1 and len(sizes) == 1
    channels = 1 if grey == {True} else 3
    width, height = sizes.pop()
    assert tuple(x.shape) == (len(specs), channels, height, width) and y is None
    order = sorted(range(len(specs)), key=lambda i: paths[i].name)
    for row, index in zip(x, order):
        expected = np.asarray(saved[index].convert("L" if channels == 1 else "RGB"))
        expected = expected[None] if channels == 1 else expected.transpose(2, 0, 1)
        np.testing.assert_array_equal(row.numpy(), expected)


@FAST
@given(size=st.integers(1, 40), shapes=st.lists(st.tuples(st.integers(1, 50), st.integers(1, 50)),
                                                 min_size=1, max_size=4),
       channels=st.sampled_from([1, 3]))
def test_image_size_option_resizes_every_image(size, shapes, channels):
    with tempfile.TemporaryDirectory() as folder:
        for i, (w, h) in enumerate(shapes):
            Image.new("RGB", (w, h), (i * 40, 90, 200)).save(Path(folder) / f"{i}.png")
        x, _, _ = read_image_folder(Path(folder), size, channels)
    assert tuple(x.shape) == (len(shapes), channels, size, size)


MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "gif": b"GIF89a", "bmp": b"BM", "tiff": b"II*\x00",
         "jpg": b"\xff\xd8\xff", "webp": b"RIFF\x00\x00\x00\x00WEBPVP8 "}


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(MAGIC)), body=st.binary(max_size=300), data=st.data())
def test_damaged_image_files_are_refused(kind, body, data):
    """Real images with bytes flipped or cut, and noise behind a format's magic number."""
    with tempfile.TemporaryDirectory() as folder:
        buffer = io.BytesIO()
        picture = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) * 5)
        picture.save(buffer, format={"jpg": "JPEG"}.get(kind, kind.upper()))
        whole = bytearray(buffer.getvalue())
        how = data.draw(st.sampled_from(["noise", "cut", "flip"]))
        if how == "noise":
            raw = MAGIC[kind] + body
        elif how == "cut":
            raw = bytes(whole[:data.draw(st.integers(0, len(whole) - 1))])
        else:
            for position in data.draw(st.lists(st.integers(0, len(whole) - 1), min_size=1,
                                               max_size=4)):
                whole[position] ^= data.draw(st.integers(1, 255))
            raw = bytes(whole)
        (Path(folder) / f"a.{kind}").write_bytes(raw)
        result = loads_or_refuses(lambda: read_image_folder(Path(folder), None, None))
        if result is not None:  # some damage leaves a decodable image (JPEG tolerates a lot)
            assert result[0].dtype == torch.uint8 and result[0].shape[0] == 1
