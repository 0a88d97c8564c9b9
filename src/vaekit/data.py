"""Datasets, held in memory as compact tensors, and the pipeline that turns them into model inputs.

Raw data come in two kinds:

    image8   uint8 images (N, C, H, W), values 0..255          digits, mnist, fashion-mnist, folders
    real     float32 arrays (N, *shape)                          .npy / .npz / .csv

A `Pipeline` maps a raw batch to what the likelihood scores, and says what that is:

    binarize     x = 1[u < v]  with v = raw / 255 (or raw in [0, 1]), u ~ U[0, 1)   (Bernoulli)
    scale        x = raw / 255                                       (continuous Bernoulli)
    levels       x = raw / 255, the 256 levels k / 255 scored as such (discretised logistic
                 and its mixture, categorical: probabilities of the 8-bit images)
    dequantize   x = (raw + u) / 256                                 (Gaussian on 8-bit images)
    standardize  x = (raw - mean) / std, train-set statistics        (Gaussian on real arrays)
    identity     x = raw

Training draws u afresh for every batch; evaluation uses one fixed, seeded u per test example,
so every run of a dataset is scored on the same test data.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .budget import check_at_most, check_bytes
from .config import parse_background
from .data_cache import cache_dir
from .dataset import Dataset, mapped_if_over_budget, split_dataset
from .errors import DataError
from .image_decode import GREY_MODES, IMAGE_SUFFIXES  # noqa: F401 (re-exported)
from .image_datasets import load_celeba, load_cifar10
from .image_folder import load_image_folder, read_image_folder
from .names import BUILTIN_DATASETS, LEVEL_LIKELIHOODS, builtin_name
from .randomness import fixed_uniform
from .safefiles import check_regular, open_regular, real_folder

BUILTIN = BUILTIN_DATASETS
ARRAY_SUFFIXES = {".npy", ".npz", ".csv"}
# Classes a label column may name: a conditional model has one input per class, and a column
# of a billion distinct values is a measurement, not a class.
MAX_CLASSES = 10_000


# ------------------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, *, data_dir: str | None = None, image_size: int | None = None,
                 channels: int | None = None, test_fraction: float = 0.2,
                 split_seed: int = 0, download: bool = True, skip_bad_images: bool = False,
                 fast_resize: bool = True, data_memory: str = "auto",
                 background: tuple[int, int, int] | None = (255, 255, 255),
                 progress: bool = True) -> Dataset:
    """Load a built-in dataset by name, or a folder of images / an array file by path.

    Image folders go through the decode-once cache: skip_bad_images leaves unreadable images
    out, fast_resize shrinks them in the decoder (image_decode.py), and data over data_memory
    (--data-memory) are memory-mapped from the cache instead of held in memory. background:
    the RGB transparent pixels of a folder's images are composited on (None drops alpha)."""
    name = builtin_name(name)  # MNIST, Digits, ...
    if name == "digits":
        return load_digits(test_fraction, split_seed)
    if name in ("mnist", "fashion-mnist"):
        return mapped_if_over_budget(load_idx_dataset(name, data_dir, download=download),
                                     data_memory)
    if name == "cifar10":
        return load_cifar10(data_dir, image_size=image_size, channels=channels,
                            download=download, data_memory=data_memory)
    if name == "celeba":
        return load_celeba(data_dir, image_size=image_size, channels=channels, download=download,
                           skip_bad=skip_bad_images, fast=fast_resize, data_memory=data_memory,
                           progress=progress)
    path = Path(name).expanduser()
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(name.lower(), BUILTIN, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DataError(f"unknown dataset {name!r}{hint}: use digits, mnist, fashion-mnist, "
                        "cifar10, celeba, or the path of an image folder or a .npy/.npz/.csv "
                        "file")
    if path.is_dir():
        return load_image_folder(path, image_size, channels, test_fraction=test_fraction,
                                 split_seed=split_seed, skip_bad=skip_bad_images,
                                 fast=fast_resize, data_memory=data_memory,
                                 background=background, progress=progress)
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}: give a folder of "
                        "images or a .npy, .npz or .csv file")
    check_regular(path, "the data", DataError)  # a FIFO or device would block or never end
    return mapped_if_over_budget(load_array_file(path, test_fraction, split_seed), data_memory)


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (UCI, Alpaydin & Kaynak), shipped with vaekit; 1,797 images.

    Pixels count ink in 4x4 blocks (0..16); they are rescaled to 0..255 so that every image
    likelihood reads them as ordinary 8-bit grey levels.
    """
    with resources.files("vaekit").joinpath("_data/digits.csv.gz").open("rb") as raw:
        table = np.loadtxt(gzip.open(raw), delimiter=",", dtype=np.float64)  # (1797, 65)
    pixels = np.rint(table[:, :64] * 255.0 / 16.0).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = table[:, 64].astype(np.int64)
    return split_dataset("digits", "image8", torch.from_numpy(pixels), torch.from_numpy(labels),
                         [str(d) for d in range(10)], test_fraction, split_seed,
                         source="vaekit/_data/digits.csv.gz (UCI optical digits, as in "
                         "scikit-learn)")


def dataset_for(config) -> Dataset:
    """The dataset a TrainConfig names, loaded with its data options."""
    return load_dataset(config.data, data_dir=config.data_dir, image_size=config.image_size,
                        channels=config.channels, test_fraction=config.test_fraction,
                        split_seed=config.split_seed, skip_bad_images=config.skip_bad_images,
                        fast_resize=config.fast_resize, data_memory=config.data_memory,
                        background=parse_background(config.background),
                        progress=config.progress)


def read_examples(source: str, *, data_dir: str | None = None, image_size: int | None = None,
                  channels: int | None = None, fast_resize: bool = True,
                  background: tuple[int, int, int] | None = (255, 255, 255)
                  ) -> tuple[Tensor, str, str]:
    """Every example of `source`, unsplit: (raw x (N, *shape), kind, what was read).

    digits, mnist, fashion-mnist: their test split. A folder: its images (class sub-folders
    too), resized and converted by image_size and channels as `load_dataset` would. An IDX
    images file (MNIST's format, raw or .gz). A .npy array, the x array of an .npz (or its only
    array), the rows of a .csv (a label column dropped).
    """
    if source in BUILTIN:
        dataset = load_dataset(source, data_dir=data_dir)
        return dataset.test_x, dataset.kind, f"{source} (test split, {len(dataset.test_x)})"
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or folder; give digits, mnist, fashion-mnist, a "
                        "folder of images, an IDX images file or a .npy/.npz/.csv file")
    if path.is_dir():
        x, _, _ = read_image_folder(path, image_size, channels, fast=fast_resize,
                                    background=background)
        return x, "image8", f"{path} ({len(x)} images)"
    name = path.name.lower()
    if name.endswith(("ubyte", "ubyte.gz")):
        array = read_idx(path)
        if array.ndim != 3:
            raise DataError(f"{path}: IDX array of shape {array.shape} is not images (N, H, W); "
                            "give the images file, not the labels file")
        x = torch.from_numpy(array).unsqueeze(1)  # (N, 1, H, W) uint8
        return x, "image8", f"{path} ({len(x)} images)"
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _load_numpy(path)
    elif suffix == ".npz":
        array = _load_npz(path)[0]
    elif suffix == ".csv":
        array = _load_csv(path)[0]
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}: give a folder of "
                        "images, an IDX images file or a .npy, .npz or .csv file")
    x, kind = _array_to_tensor(array, path)
    return x, kind, f"{path} ({len(x)} examples)"


# --- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------

IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}

IDX_SOURCES = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        "md5": {"train_x": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train_y": "d53e105ee54ea40749a09fcbcd1e9432",
                "test_x": "9fb629c4189551a2d022fa330f9573f3",
                "test_y": "ec29112dd5afa0611ce80d1b7f02629c"},
        "system_dirs": ["/usr/share/datasets/mnist", "/usr/share/mnist"],
        "labels": [str(d) for d in range(10)],
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://ossci-datasets.s3.amazonaws.com/fashion-mnist/"],
        "md5": {"train_x": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train_y": "25c81989df183df01b3e8a0aad5dffbe",
                "test_x": "bef4ecab320f06d8554ea6380940ec79",
                "test_y": "bb300cfdad3c16e7a12a480ee83cd310"},
        "system_dirs": ["/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist"],
        "labels": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"],
    },
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or .gz) of unsigned bytes, checking its header against its length."""
    try:
        with open_regular(path, "an IDX file", DataError) as handle:
            stream = gzip.open(handle, "rb") if path.suffix == ".gz" else handle
            with stream:
                raw = _read_idx_bytes(stream, path)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc}); replace the file with a fresh copy") from None
    if not raw:
        raise DataError(f"{path}: the file is empty (0 bytes); replace it with the original file")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (wrong magic number); replace it with the "
                        "original file")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned bytes (0x08); "
                        "give the original MNIST-format file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; replace the file with a fresh copy")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if expected == 0:  # numpy refuses shapes like (0, 2**32 - 1, 2**32 - 1) anyway
        raise DataError(f"{path}: the IDX header declares dimensions {dims}, which hold no data; "
                        "replace the file with the original")
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header promises {expected} bytes of data but the file holds "
                        f"{len(raw) - header}; the file is truncated or corrupt, replace it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_bytes(stream, path: Path) -> bytearray:
    """Header, then as many bytes as it promises (checked against the memory limit first, so a
    small .gz that inflates without end is refused, not decompressed); one byte more tells a
    file longer than its header says."""
    raw = bytearray(stream.read(4))
    if len(raw) == 4 and raw[0] == 0 and raw[1] == 0 and raw[2] == 0x08 and raw[3] > 0:
        raw += stream.read(4 * raw[3])
        if len(raw) == 4 + 4 * raw[3]:
            promised = math.prod(struct.unpack(f">{raw[3]}I", raw[4:]))
            check_bytes(f"{path} (an IDX file of {promised:,} bytes)", promised,
                        "give the original MNIST-format file", DataError)
            raw += stream.read(promised + 1)  # writable: the array is not copied again
    return raw


def _find_idx(folder: Path, stem: str) -> Path | None:
    # Some mirrors name files t10k-images.idx3-ubyte; accept both spellings.
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def locate_idx_files(name: str, data_dir: str | None, download: bool = True) -> dict[str, Path]:
    """The four IDX files of `name`: from data_dir, the cache, system folders, or a download."""
    spec = IDX_SOURCES[name]
    folders = ([Path(data_dir).expanduser()] if data_dir else []) + [cache_dir() / name] + \
        [Path(d) for d in spec["system_dirs"]]
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"--data-dir {data_dir}: no such folder; give the folder holding the "
                        f"{name} IDX files")
    for folder in folders:
        found = {key: _find_idx(folder, stem) for key, stem in IDX_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        if data_dir and folder == folders[0] and any(found.values()):
            missing = [IDX_FILES[k] for k, v in found.items() if v is None]
            raise DataError(f"{folder}: {name} is incomplete, {missing[0]} is missing; add it "
                            "(raw or .gz)")
    if not download:
        raise DataError(_idx_missing_message(name))
    return download_idx(name)


def _idx_missing_message(name: str) -> str:
    hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
    return (f"{name} files not found and could not be downloaded: put the four IDX files "
            f"(train-images-idx3-ubyte.gz, ...) in a folder and pass --data-dir FOLDER, or copy "
            f"them to {cache_dir() / name}{hint}")


def download_idx(name: str) -> dict[str, Path]:
    """Fetch the four files from the first mirror that answers, verifying each MD5 checksum."""
    from tqdm import tqdm

    spec = IDX_SOURCES[name]
    target = cache_dir() / name
    found: dict[str, Path] = {}
    for key, stem in IDX_FILES.items():
        filename = stem + ".gz"
        destination = target / filename
        errors = []
        for mirror in spec["mirrors"]:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                real_folder(target, create=True, error=DataError)  # never a planted link
                with urllib.request.urlopen(mirror + filename, timeout=30) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    buffer = io.BytesIO()
                    with tqdm(total=total, unit="B", unit_scale=True, desc=filename,
                              leave=False) as bar:
                        while chunk := response.read(1 << 16):
                            buffer.write(chunk)
                            bar.update(len(chunk))
                data = buffer.getvalue()
                digest = hashlib.md5(data).hexdigest()  # noqa: S324 (checksum, not security)
                if digest != spec["md5"][key]:
                    errors.append(f"{mirror}: checksum {digest} != {spec['md5'][key]}")
                    continue
                with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:
                    tmp.write(data)
                os.replace(tmp.name, destination)
                found[key] = destination
                break
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                errors.append(f"{mirror}: {exc}")
        if key not in found:
            raise DataError(_idx_missing_message(name))
    return found


def load_idx_dataset(name: str, data_dir: str | None = None, download: bool = True) -> Dataset:
    paths = locate_idx_files(name, data_dir, download)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{paths[split + '_x']}: expected images (N, H, W) and N labels, got "
                            f"{images.shape} and {labels.shape}; check the files are {name}'s")
    as_images = (lambda a: torch.from_numpy(a).unsqueeze(1))  # (N, 1, H, W) uint8, shared
    as_labels = (lambda a: torch.from_numpy(a.astype(np.int64)))
    return Dataset(name, "image8", as_images(arrays["train_x"]), as_images(arrays["test_x"]),
                   as_labels(arrays["train_y"]), as_labels(arrays["test_y"]),
                   IDX_SOURCES[name]["labels"], source=str(paths["train_x"].parent))


# --- numeric arrays -----------------------------------------------------------------------------


def load_array_file(path: Path, test_fraction: float, split_seed: int) -> Dataset:
    """.npy (one array), .npz (x[, y][, x_test[, y_test]]) or .csv (numbers under an optional
    header naming the features; a label column of class numbers or names)."""
    suffix = path.suffix.lower()
    test_x = test_y = y = None
    label_names = feature_names = None
    if suffix == ".npy":
        x = _load_numpy(path)
    elif suffix == ".npz":
        x, y, test_x, test_y = _load_npz(path)
    else:
        x, y, label_names, feature_names = _load_csv(path)
    name = str(path)
    x, kind = _array_to_tensor(x, path)
    y = _labels_to_tensor(y, len(x), path, "y")
    if test_x is not None:
        test_x, test_kind = _array_to_tensor(test_x, path, key="x_test")
        if test_kind != kind or test_x.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test {tuple(test_x.shape[1:])} {test_kind} does not match "
                            f"x {tuple(x.shape[1:])} {kind}; save both with the same shape and dtype")
        test_y = _labels_to_tensor(test_y, len(test_x), path, "y_test")
        if (y is None) != (test_y is None):
            raise DataError(f"{path}: give labels for both splits (y and y_test) or for neither")
        if y is not None:
            (y, test_y), label_names = class_labels([y, test_y], path)
        return Dataset(name, kind, x, test_x, y, test_y, label_names, source=str(path.resolve()))
    if y is not None and label_names is None:
        (y,), label_names = class_labels([y], path)
    dataset = split_dataset(name, kind, x, y, label_names, test_fraction, split_seed,
                            source=str(path.resolve()))
    dataset.feature_names = feature_names
    return dataset


def class_labels(labels: list[Tensor], path: Path) -> tuple[list[Tensor], list[str]]:
    """Class numbers -> (indices, names). Labels 0..K-1 with K <= MAX_CLASSES keep their numbers
    (class k is named "k", absent ones included); larger values are mapped sparsely, in order,
    to the distinct values present, which must be at most MAX_CLASSES."""
    top = max(int(y.max()) for y in labels)
    if top < MAX_CLASSES:
        return labels, [str(v) for v in range(top + 1)]
    values = torch.unique(torch.cat(labels))  # sorted
    check_at_most(f"{path}: the label column's distinct values", len(values), MAX_CLASSES,
                  "a conditional model has one input per class; give class numbers, not "
                  "measurements", DataError)
    return [torch.searchsorted(values, y) for y in labels], [str(int(v)) for v in values]


def _check_npy_header(handle, path: Path, key: str = "x") -> None:
    """The shape and dtype a .npy header declares, checked against the memory limit before
    numpy allocates the array it describes."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(handle)
        reader = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}[version]
        shape, _, dtype = reader(handle, max_header_size=10000)
    except Exception:  # noqa: BLE001 (np.load below names the damage, or reads version 3)
        handle.seek(0)
        return
    handle.seek(0)
    if dtype.hasobject:
        return  # np.load refuses it (no pickles)
    check_bytes(f"{path}: {key} of shape {shape}", math.prod(shape) * dtype.itemsize,
                "save a smaller array", DataError)


def _load_numpy(path: Path) -> np.ndarray:
    try:
        with open_regular(path, "a .npy file", DataError) as handle:
            _check_npy_header(handle, path)
            return np.load(handle, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds Python objects, which vaekit never unpickles; save a "
                            "numeric array (np.save with a numeric dtype)") from None
        raise DataError(f"{path}: not a readable .npy file ({exc}); save it with np.save") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc}); save it with np.save") from None


def _load_npz(path: Path):
    try:
        with open_regular(path, "a .npz file", DataError) as handle, \
                np.load(handle, allow_pickle=False) as archive:
            for member in archive.zip.infolist():  # inflated sizes, before inflating
                check_bytes(f"{path}: member {member.filename} ({member.file_size:,} bytes "
                            "inflated)", member.file_size, "save smaller arrays", DataError)
                # The zip's sizes are the writer's word; the array's own header decides what
                # numpy allocates, so it is checked too (a few bytes inflated, no more).
                with archive.zip.open(member) as inner:
                    _check_npy_header(inner, path, member.filename.removesuffix(".npy"))
            arrays = {key: archive[key] for key in archive.files}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds Python objects, which vaekit never unpickles; save "
                            "numeric arrays (np.savez with numeric dtypes)") from None
        raise DataError(f"{path}: not a readable .npz file ({exc}); save it with np.savez") \
            from None
    except (OSError, EOFError, Exception) as exc:  # zipfile raises BadZipFile and others
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}); save it with "
                        "np.savez") from None
    if "x" not in arrays:
        if len(arrays) == 1:
            return next(iter(arrays.values())), None, None, None
        raise DataError(f"{path}: no array named 'x' (found {', '.join(arrays) or 'none'}); save "
                        "the data as np.savez(file, x=data[, y=labels, x_test=..., y_test=...])")
    return arrays["x"], arrays.get("y"), arrays.get("x_test"), arrays.get("y_test")


# Header names of a CSV's label column, matched without regard to case (the first one found).
LABEL_COLUMNS = ("label", "labels", "y", "class", "target")


def _load_csv(path: Path):
    """A CSV table -> (features (N, D) float64, labels (N,) or None, class names or None,
    feature names (D,) or None). A header line names the features; its label column (one of
    LABEL_COLUMNS) may hold class numbers or class names (text): names are sorted and become
    classes 0, 1, ...; the run keeps them for its pictures and the explorer."""
    size = check_regular(path, "a CSV file", DataError).st_size
    # Each value takes at least 2 characters ("0,") and is held as 8 bytes, plus Python's lists.
    check_bytes(f"{path} ({size:,} bytes of CSV)", size * 4, "use a smaller file or save the "
                "data as .npy", DataError)
    try:
        with open_regular(path, "a CSV file", DataError) as handle:
            text = handle.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc}); save it as a CSV file") \
            from None
    try:
        rows = [row for row in csv.reader(io.StringIO(text))
                if row and any(c.strip() for c in row)]
    except csv.Error as exc:  # a field over the csv module's limit, a NUL byte, ...
        raise DataError(f"{path}: not a CSV table of numbers ({exc}); give one row of numbers "
                        "per example, each value a short number") from None
    if not rows:
        raise DataError(f"{path}: empty CSV file; give one row of numbers per example")
    header = None
    if any(not _is_number(cell) for cell in rows[0]):
        header, rows = [cell.strip() for cell in rows[0]], rows[1:]
    if not rows:
        raise DataError(f"{path}: CSV has a header but no rows of data")
    width = len(header) if header else len(rows[0])
    label_column = None
    if header:
        label_column = next((j for j, h in enumerate(header) if h.lower() in LABEL_COLUMNS), None)
    values = np.empty((len(rows), width), dtype=np.float64)
    label_cells = []
    for i, row in enumerate(rows):
        line = i + (2 if header else 1)
        if len(row) != width:
            raise DataError(f"{path}: line {line} has {len(row)} columns, expected {width}; give "
                            "every row the same number of values")
        for j, cell in enumerate(row):
            if j == label_column:
                label_cells.append(cell.strip())
                continue
            try:
                values[i, j] = float(cell)
            except ValueError:
                named = f" ({header[j]!r})" if header else ""
                labels_hint = (f"; a column of class names must be named one of "
                               f"{', '.join(LABEL_COLUMNS)}" if header else "")
                raise DataError(f"{path}: line {line}, column {j + 1}{named} is "
                                f"{cell.strip()!r}, not a number; CSV features must be numeric "
                                f"(a header line is allowed){labels_hint}") from None
    if label_column is None:
        return values, None, None, header
    features = np.delete(values, label_column, axis=1)
    feature_names = header[:label_column] + header[label_column + 1:]
    if features.shape[1] == 0:
        raise DataError(f"{path}: only a label column; add feature columns")
    labels, names = _csv_labels(label_cells, path, header[label_column])
    return features, labels, names, feature_names


def _csv_labels(cells: list[str], path: Path, column: str):
    """The cells of a label column -> (labels, class names): numbers stay class numbers (names
    None, decided by class_labels); any text makes every distinct cell a class name, sorted."""
    if "" in cells:
        line = cells.index("") + 2
        raise DataError(f"{path}: line {line} has an empty {column!r}; give every row its class")
    if all(_is_number(cell) for cell in cells):
        return np.array([float(cell) for cell in cells]), None
    names = sorted(set(cells))
    check_at_most(f"{path}: the {column!r} column's distinct class names", len(names),
                  MAX_CLASSES, "a conditional model has one input per class; give a column of "
                  "classes, not free text", DataError)
    index = {name: k for k, name in enumerate(names)}
    return np.array([index[cell] for cell in cells], dtype=np.int64), names


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _array_to_tensor(array: np.ndarray, path: Path, key: str = "x") -> tuple[Tensor, str]:
    """uint8 images (N, H, W) / (N, C, H, W) / (N, H, W, C) -> image8; other numbers -> real."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key} has dtype {array.dtype}, not numbers; save a numeric array")
    if array.ndim < 2 or array.shape[0] < 1 or math.prod(array.shape[1:]) == 0:
        raise DataError(f"{path}: {key} has shape {array.shape}; expected (examples, features...) "
                        "with at least one example and one feature")
    if array.dtype == np.uint8 and array.ndim in (3, 4):
        if array.ndim == 3:
            array = array[:, None]
        elif array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3):
            array = array.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        elif array.shape[1] not in (1, 3):
            raise DataError(f"{path}: {key} images have shape {array.shape[1:]}; expected 1 or 3 "
                            "channels, as (N, C, H, W) or (N, H, W, C)")
        return torch.from_numpy(np.ascontiguousarray(array)), "image8"
    array = array.astype(np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        index = np.argwhere(bad)[0]
        raise DataError(f"{path}: {key} has a non-finite value ({array[tuple(index)]}) at index "
                        f"{tuple(int(i) for i in index)}; remove or fill missing values")
    # Data are held as float32: a finite float64 beyond its range would turn into inf.
    big = np.abs(array) > np.finfo(np.float32).max
    if big.any():
        index = np.argwhere(big)[0]
        raise DataError(f"{path}: {key} has a value ({array[tuple(index)]:g}) at index "
                        f"{tuple(int(i) for i in index)} beyond the 32-bit float range; rescale "
                        "the data")
    return torch.from_numpy(array.astype(np.float32)), "real"


def _labels_to_tensor(labels, n: int, path: Path, key: str) -> Tensor | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise DataError(f"{path}: {key} has shape {labels.shape}, expected ({n},), one label per "
                        "example")
    if labels.dtype.kind not in "biuf" or not np.all(np.isfinite(labels)) or \
            np.any(labels != np.round(labels)) or np.any(labels < 0) or \
            np.any(labels > 2**53):  # beyond, floats skip integers and int64 may overflow
        raise DataError(f"{path}: {key} must hold class numbers 0, 1, 2, ...; convert the labels "
                        "to non-negative integers")
    return torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# The pipeline from raw data to what the likelihood scores


LIKELIHOODS_FOR_KIND = {"image8": ("bernoulli", "continuous-bernoulli", "gaussian",
                                   *LEVEL_LIKELIHOODS),
                        "real": ("bernoulli", "continuous-bernoulli", "gaussian")}


# Built-in grey sets whose published VAE baselines are binarised (Kingma & Welling, Burda et
# al.): `auto` keeps the Bernoulli likelihood on them so their figures compare with the papers'.
BINARISED_BENCHMARKS = ("digits", "mnist", "fashion-mnist")
# A grey image set is "strokes" (MNIST-like) when nearly all its pixels lie within NEAR_EXTREME
# levels of black or white; binarising those loses little. MNIST: 92% of pixels; Fashion-MNIST
# 63%, a natural grey photo far fewer.
NEAR_EXTREME, STROKES_SHARE = 32, 0.9
STATISTICS_PIXELS = 2_000_000  # pixels the choice looks at (the first training images)


def resolve_likelihood(requested: str, dataset: Dataset) -> str:
    """The likelihood `requested` names; for 'auto', the one choose_likelihood picks."""
    return choose_likelihood(requested, dataset)[0]


def choose_likelihood(requested: str, dataset: Dataset) -> tuple[str, str]:
    """(likelihood, why) for `requested` ('auto' is decided from the data):

        8-bit images    bernoulli for the binarised benchmarks (digits, mnist, fashion-mnist)
                        and for grey images of near-binary strokes (at least 90% of pixels
                        within 32 levels of black or white); otherwise discretized-logistic,
                        a probability of the 256 levels of every channel (colour, grey photos)
        real arrays     bernoulli for data in [0, 1], gaussian otherwise
    """
    if requested != "auto":
        return requested, "chosen with --likelihood"
    x = dataset.train_x
    if dataset.kind == "image8":
        if dataset.name in BINARISED_BENCHMARKS:
            return "bernoulli", (f"{dataset.name} is a binarised benchmark: its grey levels "
                                 "are binarised as in the papers it is compared with")
        channels = dataset.shape[0] if len(dataset.shape) == 3 else 1
        per_image = max(1, math.prod(dataset.shape))
        head = x[:max(1, STATISTICS_PIXELS // per_image)]  # (n, *shape) uint8
        extreme = float(((head <= NEAR_EXTREME) | (head >= 255 - NEAR_EXTREME)).float().mean())
        if channels == 1 and extreme >= STROKES_SHARE:
            return "bernoulli", (f"{extreme:.0%} of the pixels are near black or white "
                                 "(strokes, as MNIST): binarised")
        what = "colour images" if channels == 3 else \
            f"grey images with {1 - extreme:.0%} of pixels in the mid-tones"
        return "discretized-logistic", (f"{what}: a probability of their 8-bit levels, not "
                                        "binarised (--likelihood bernoulli to binarise)")
    if bool(((x >= 0) & (x <= 1)).all()):
        return "bernoulli", "every value lies in [0, 1]"
    return "gaussian", "real values outside [0, 1]"


@dataclass
class Pipeline:
    """Raw batch -> likelihood input. See the module docstring for the modes."""

    mode: str  # binarize | scale | levels | dequantize | standardize | identity
    kind: str  # image8 | real
    split_seed: int
    mean: Tensor | None = None  # (1, *shape) standardize only
    std: Tensor | None = None
    description: str = ""
    log_jacobian: float = 0.0  # added to densities of x to give densities of the data's own units
    chosen: str = ""  # why `--likelihood auto` chose this likelihood (said once, not stored)
    noisy: bool = field(init=False)

    def __post_init__(self):
        self.noisy = self.mode in ("binarize", "dequantize")

    @staticmethod
    def build(dataset: Dataset, likelihood: str, binarize: str, split_seed: int) -> "Pipeline":
        kind, shape = dataset.kind, dataset.shape
        dims = math.prod(shape)
        train_x = dataset.train_x
        if likelihood not in LIKELIHOODS_FOR_KIND[kind]:
            why = " (it scores the 256 levels of 8-bit images)" \
                if likelihood in LEVEL_LIKELIHOODS else ""
            raise DataError(f"likelihood {likelihood!r} cannot score {kind} data{why}: use one "
                            f"of {', '.join(LIKELIHOODS_FOR_KIND[kind])}")
        if kind == "image8":
            if likelihood == "bernoulli":
                how = "dynamically binarised" if binarize == "dynamic" else "binarised (fixed)"
                return Pipeline("binarize", kind, split_seed,
                                description=f"{how} pixels (test set: one fixed seeded "
                                "binarisation), Bernoulli: log-probability of the binary images")
            if likelihood in LEVEL_LIKELIHOODS:
                return Pipeline("levels", kind, split_seed,
                                description=f"8-bit levels scaled to k / 255, {likelihood}: "
                                "log-probability of the 8-bit images")
            if likelihood == "continuous-bernoulli":
                return Pipeline("scale", kind, split_seed,
                                description="grey levels scaled to [0, 1], continuous Bernoulli: "
                                "a density on [0, 1]^D, not a probability of 8-bit values")
            return Pipeline("dequantize", kind, split_seed, log_jacobian=-dims * math.log(256.0),
                            description="8-bit pixels with uniform dequantisation noise, Gaussian: "
                            "a lower bound on the log-probability of the 8-bit images")
        # real-valued arrays
        lo, hi = float(train_x.min()), float(train_x.max())
        binary = bool(((train_x == 0) | (train_x == 1)).all())
        if likelihood in ("bernoulli", "continuous-bernoulli") and (lo < 0 or hi > 1):
            raise DataError(f"{dataset.name}: values range over [{lo:g}, {hi:g}] but the "
                            f"{likelihood} likelihood scores values in [0, 1]; rescale the data "
                            "or pass --likelihood gaussian")
        if likelihood == "bernoulli":
            if binary:
                return Pipeline("identity", kind, split_seed,
                                description="binary values, Bernoulli: log-probability")
            return Pipeline("binarize", kind, split_seed,
                            description="values in [0, 1] binarised as probabilities, Bernoulli: "
                            "log-probability of the binary draws")
        if likelihood == "continuous-bernoulli":
            return Pipeline("identity", kind, split_seed,
                            description="values in [0, 1], continuous Bernoulli density")
        mean = train_x.mean(0, keepdim=True)  # (1, *shape)
        std = train_x.std(0, keepdim=True).clamp_min(1e-6 * max(1.0, float(train_x.abs().max())))
        return Pipeline("standardize", kind, split_seed, mean=mean, std=std,
                        log_jacobian=-float(std.log().sum()),
                        description="real values (standardised with training mean and standard "
                        "deviation), Gaussian: log-density of the original values")

    def info(self) -> dict:
        return {"mode": self.mode, "kind": self.kind, "split_seed": self.split_seed,
                "description": self.description, "log_jacobian": self.log_jacobian}

    def statistics(self) -> dict[str, Tensor]:
        """Tensors the pipeline needs besides info() (saved as pipeline.safetensors)."""
        return {} if self.mean is None else {"mean": self.mean.cpu(), "std": self.std.cpu()}

    @staticmethod
    def from_info(info: dict, statistics: dict[str, Tensor]) -> "Pipeline":
        return Pipeline(info["mode"], info["kind"], info["split_seed"],
                        mean=statistics.get("mean"), std=statistics.get("std"),
                        description=info["description"], log_jacobian=info["log_jacobian"])

    def to(self, device: torch.device) -> "Pipeline":
        if self.mean is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def apply(self, raw: Tensor, u: Tensor | None) -> Tensor:
        """Raw batch (B, *shape) and noise u (B, *shape) in [0, 1) -> float x (B, *shape)."""
        if self.mode == "binarize":
            probability = raw.float() / 255.0 if self.kind == "image8" else raw
            return (u < probability).float()
        if self.mode == "dequantize":
            return (raw.float() + u) / 256.0
        if self.mode in ("scale", "levels"):
            return raw.float() / 255.0
        if self.mode == "standardize":
            return (raw - self.mean) / self.std
        return raw.float()

    def original(self, raw: Tensor) -> Tensor:
        """Raw examples as pictures before the pipeline's noise: images in [0, 1]."""
        return raw.float() / 255.0 if self.kind == "image8" else raw.float()

    @property
    def input_name(self) -> str:
        """What the model sees of an example, where it is not the example itself."""
        return {"binarize": "binarised input", "dequantize": "dequantised input"}.get(
            self.mode, "model input")

    def display(self, x: Tensor) -> Tensor:
        """Model-space values (e.g. a likelihood mean) -> the data's units; images in [0, 1]."""
        if self.kind == "image8":
            return x.clamp(0, 1)
        if self.mode == "standardize":
            return x * self.std + self.mean
        return x

    def fixed(self, raw: Tensor, start: int, split: str = "test") -> Tensor:
        """The evaluation version of examples start.. of a split: noise fixed per example index."""
        if not self.noisy:
            return self.apply(raw, None)
        u = fixed_uniform(tuple(raw.shape[1:]), start, start + len(raw),
                          (self.split_seed, "fixed", split))
        return self.apply(raw, u.to(raw.device))


def perturb_pixels(raw: Tensor, rate: float, generator: torch.Generator, global_batch: int,
                   rows: slice) -> Tensor:
    """Each pixel replaced, with probability `rate`, by a uniform random level: the perturbed
    inputs of Ren et al. 2019's background model. raw (B_local, *shape) is this process's rows
    of a global batch: uint8 levels 0..255, or the 0/1 floats of a fixed binarisation (then a
    random bit). The noise is drawn for the whole global batch and sliced, so it is the same
    for any number of processes."""
    shape = (global_batch, *raw.shape[1:])
    replace = torch.rand(shape, generator=generator, device=raw.device)[rows] < rate
    if raw.dtype == torch.uint8:
        levels = torch.randint(0, 256, shape, generator=generator, device=raw.device,
                               dtype=torch.uint8)[rows]
    else:
        levels = (torch.rand(shape, generator=generator, device=raw.device)[rows]
                  < 0.5).to(raw.dtype)
    return torch.where(replace, levels, raw)  # (B_local, *shape)


def batches(n: int, batch_size: int):
    """(start, stop) pairs covering range(n) in order."""
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)

