"""The image datasets VAE papers use, by name: CIFAR-10 and CelebA.

    cifar10   the binary version (cifar-10-batches-bin/: data_batch_1..5.bin, test_batch.bin),
              records of 1 label byte + 3,072 pixel bytes (1,024 red, green, blue, row by
              row); 50,000 train / 10,000 test images of 3 x 32 x 32 in 10 classes. The
              Python version is pickled and never read.
    celeba    the aligned-and-cropped faces (img_align_celeba/, 202,599 JPEGs of 178 x 218) and
              list_eval_partition.txt: partition 0 trains (162,770), 2 tests (19,962), 1 (the
              validation partition) is not used. Preprocessed as in the VAE literature
              (PyTorch-VAE, DCGAN): the centred 148 x 148 square, resized to 64 x 64
              (--image-size changes the 64).

Each is looked for in --data-dir (the files themselves or the folder holding them), then the
cache ($VAEKIT_CACHE/NAME), else downloaded there from the publishers' addresses with MD5
verification. Both are decoded once into the cache (data_cache.py) like an image folder, so data
over --data-memory are memory-mapped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .budget import check_bytes
from .data_cache import Allocation, cache_dir, cached_array, file_listing
from .dataset import Dataset, from_cache
from .downloads import fetch, unzip
from .errors import DataError
from .image_folder import cache_images, stderr_line
from .safefiles import open_regular, read_regular

# --- CIFAR-10 -----------------------------------------------------------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR_TEST = ["test_batch.bin"]
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                "ship", "truck"]
CIFAR_MAX_FILE = 10_000 * CIFAR_RECORD  # the real files: 10,000 records each


def _cifar_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / CIFAR_FOLDER):
        if all((candidate / name).is_file() for name in CIFAR_TRAIN + CIFAR_TEST):
            return candidate
    return None


def locate_cifar10(data_dir: str | None, download: bool = True) -> Path:
    """The folder of the six .bin files: in data_dir, the cache, or downloaded and unpacked."""
    home = cache_dir() / "cifar10"
    if data_dir:
        given = Path(data_dir).expanduser()
        if not given.is_dir():
            raise DataError(f"--data-dir {data_dir}: no such folder; give the folder holding "
                            f"{CIFAR_FOLDER}/ (CIFAR-10's binary version)")
        found = _cifar_folder(given)
        if found is not None:
            return found
        if (given / "cifar-10-binary.tar.gz").is_file():
            return _unpack_cifar(given / "cifar-10-binary.tar.gz", home)
        raise DataError(f"{given}: no {CIFAR_FOLDER}/ with data_batch_1.bin ... test_batch.bin; "
                        "give the folder of CIFAR-10's binary version (not the Python version)")
    found = _cifar_folder(home)
    if found is not None:
        return found
    archive = home / "cifar-10-binary.tar.gz"
    if not archive.is_file():
        failures = fetch([CIFAR_URL], archive, CIFAR_MD5) if download else ["not downloading"]
        if failures:
            raise DataError(f"cifar10 not found and could not be downloaded ({failures[0]}): "
                            f"download {CIFAR_URL} and pass --data-dir FOLDER, or put it in "
                            f"{home}")
    return _unpack_cifar(archive, home)


def _unpack_cifar(archive: Path, home: Path) -> Path:
    """Only the six .bin files of the tar.gz, each checked for its size before it is read."""
    import tarfile

    wanted = {f"{CIFAR_FOLDER}/{name}" for name in CIFAR_TRAIN + CIFAR_TEST}
    target = home / CIFAR_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted:
                    continue
                if not member.isreg() or member.size > CIFAR_MAX_FILE:
                    raise DataError(f"{archive}: {member.name} is not a file of at most "
                                    f"{CIFAR_MAX_FILE:,} bytes; delete it and download it again")
                with tar.extractfile(member) as source:
                    data = source.read(CIFAR_MAX_FILE + 1)
                tmp = target / f".{Path(member.name).name}.tmp"
                tmp.write_bytes(data)
                tmp.replace(target / Path(member.name).name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: not a readable tar.gz file ({exc}); delete it and download "
                        "it again") from None
    found = _cifar_folder(home)
    if found is None:
        raise DataError(f"{archive}: lacks some of {', '.join(CIFAR_TRAIN + CIFAR_TEST)}; "
                        "delete it and download it again")
    return found


def _check_framing(path: Path, size: int) -> int:
    if size == 0 or size % CIFAR_RECORD:
        raise DataError(f"{path}: {size:,} bytes is not a whole number of CIFAR-10 records "
                        f"({CIFAR_RECORD:,} bytes each); give the binary version's files, not "
                        "the Python version (which is pickled and never read)")
    return size


def read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One .bin file: images uint8 (n, 3, 32, 32) and labels int64 (n,)."""
    with open_regular(path, "a CIFAR-10 .bin file", DataError) as handle:
        size = _check_framing(path, handle.seek(0, 2))
        check_bytes(f"{path} ({size:,} bytes)", size, "give the original file", DataError)
        handle.seek(0)
        records = np.frombuffer(handle.read(size), dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CIFAR_LABELS):
        row = int(np.argmax(labels >= len(CIFAR_LABELS)))
        raise DataError(f"{path}: record {row} has label {labels[row]}, not a CIFAR-10 class "
                        "(0..9); the file is not CIFAR-10's or is damaged, replace it")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels  # (n, 3, 32, 32)


def load_cifar10(data_dir: str | None, *, image_size: int | None = None,
                 channels: int | None = None, download: bool = True,
                 data_memory: str = "auto") -> Dataset:
    if image_size not in (None, 32) or channels not in (None, 3):
        raise DataError("cifar10 holds 3 x 32 x 32 colour images; drop --image-size and "
                        "--channels")
    folder = locate_cifar10(data_dir, download)
    files = [folder / name for name in CIFAR_TRAIN + CIFAR_TEST]

    def build(allocate: Allocation) -> tuple[dict, dict]:
        parts = [read_cifar_file(path) for path in files]  # 180 MB for the real files
        out = allocate((sum(len(images) for images, _ in parts), 3, 32, 32))
        out[:] = np.concatenate([images for images, _ in parts])
        counts = [len(images) for images, _ in parts]
        return {}, {"labels": np.concatenate([y for _, y in parts]).tolist(), "counts": counts}

    for path in files:  # the records' framing, from the sizes, before anything is written
        _check_framing(path, path.stat().st_size)
    cache = cached_array(f"cifar10:{folder.resolve()}", {"format": "binary"},
                         file_listing(files, folder), build, log=stderr_line, announce=False)
    labels = np.asarray(cache.meta["labels"], dtype=np.int64)
    counts = cache.meta["counts"]
    n_train = sum(counts[:len(CIFAR_TRAIN)])
    split = (np.arange(n_train), np.arange(n_train, sum(counts)))
    return from_cache(cache, "cifar10", labels, CIFAR_LABELS, split, test_fraction=0.0,
                      split_seed=0, data_memory=data_memory, source=str(folder))


# --- CelebA -------------------------------------------------------------------------------------

# The publishers' Google Drive files (as torchvision lists them), fetched without its
# confirmation page for large files.
DRIVE = "https://drive.usercontent.google.com/download?export=download&confirm=t&id="
CELEBA_FILES = {
    "img_align_celeba.zip": ("0B7EVK8r0v71pZjFTYXZWM3FlRnM", "00d2c5bc6d35e252742224ab0c1e8fcb"),
    "list_eval_partition.txt": ("0B7EVK8r0v71pY0NSMzRuSXJEVkk",
                                "d32c9cbf5e040fd4025c592c306e6668"),
}
CELEBA_CROP = 148
CELEBA_SIZE = 64
CELEBA_MAX_IMAGE = 4 * 2**20  # an aligned JPEG is about 10 KB
PARTITION_MAX_BYTES = 64 * 2**20  # the real file: 3.4 MB
PARTITION_LINE = re.compile(r"^(\S+\.(?:jpg|png))\s+([012])\s*$")


def _celeba_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / "celeba"):
        if (candidate / "img_align_celeba").is_dir() and \
                (candidate / "list_eval_partition.txt").is_file():
            return candidate
    return None


def locate_celeba(data_dir: str | None, download: bool = True) -> Path:
    """The folder holding img_align_celeba/ and list_eval_partition.txt."""
    home = cache_dir() / "celeba"
    if data_dir:
        given = Path(data_dir).expanduser()
        found = _celeba_folder(given) if given.is_dir() else None
        if found is None:
            raise DataError(f"--data-dir {data_dir}: no img_align_celeba/ folder beside "
                            "list_eval_partition.txt; give the folder holding both (CelebA's "
                            "aligned-and-cropped images)")
        return found
    found = _celeba_folder(home)
    if found is not None:
        return found
    if not download:
        raise DataError(_celeba_missing(home, "not downloading"))
    for name, (file_id, md5) in CELEBA_FILES.items():
        if not (home / name).is_file() and not (name.endswith(".zip")
                                               and (home / "img_align_celeba").is_dir()):
            failures = fetch([DRIVE + file_id], home / name, md5)
            if failures:
                raise DataError(_celeba_missing(home, failures[0]))
    if not (home / "img_align_celeba").is_dir():
        unpacked = home / ".img_align_celeba.unpacked"
        if not (unpacked / "img_align_celeba").is_dir():  # else unpacked before a kill
            unzip(home / "img_align_celeba.zip", unpacked, prefix="img_align_celeba",
                  max_member=CELEBA_MAX_IMAGE)
        (unpacked / "img_align_celeba").rename(home / "img_align_celeba")
        unpacked.rmdir()
        (home / "img_align_celeba.zip").unlink()
    return home


def _celeba_missing(home: Path, why: str) -> str:
    return (f"celeba not found and could not be downloaded ({why}): put img_align_celeba/ and "
            f"list_eval_partition.txt (from the CelebA site) in a folder and pass --data-dir "
            f"FOLDER, or in {home}")


def read_partition(path: Path) -> list[tuple[str, int]]:
    """list_eval_partition.txt: (file name, partition 0 | 1 | 2) per image."""
    text = read_regular(path, "CelebA's list_eval_partition.txt", DataError,
                        max_bytes=PARTITION_MAX_BYTES, fix="give CelebA's original file")
    entries = []
    for number, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        match = PARTITION_LINE.match(line)
        if not match or "/" in match.group(1):
            raise DataError(f"{path}: line {number} is {line[:60]!r}, not 'NAME.jpg 0|1|2'; "
                            "give CelebA's original list_eval_partition.txt")
        entries.append((match.group(1), int(match.group(2))))
    if not entries:
        raise DataError(f"{path}: lists no images; give CelebA's original list_eval_partition.txt")
    return entries


def load_celeba(data_dir: str | None, *, image_size: int | None = None,
                channels: int | None = None, download: bool = True, skip_bad: bool = False,
                fast: bool = True, data_memory: str = "auto", progress: bool = True) -> Dataset:
    root = locate_celeba(data_dir, download)
    entries = [(name, part) for name, part in read_partition(root / "list_eval_partition.txt")
               if part != 1]
    images = root / "img_align_celeba"
    base = os.fspath(images)
    files = [os.path.join(base, name) for name, _ in entries]  # strings: 202,599 of them
    missing = next((path for path in files if not os.path.exists(path)), None)
    if missing is not None:
        raise DataError(f"{missing}: listed in list_eval_partition.txt but missing; the folder "
                        "is incomplete, unpack img_align_celeba.zip again")
    cache = cache_images(images, files, image_size or CELEBA_SIZE, channels or 3,
                         crop=CELEBA_CROP, fast=fast, skip_bad=skip_bad,
                         source=f"celeba:{images.resolve()}", progress=progress)
    parts = np.array([part for _, part in entries])
    split = (np.flatnonzero(parts == 0), np.flatnonzero(parts == 2))
    if not len(split[0]) or not len(split[1]):
        raise DataError(f"{root / 'list_eval_partition.txt'}: needs images of partition 0 "
                        "(train) and 2 (test); give CelebA's original file")
    return from_cache(cache, "celeba", None, None, split, test_fraction=0.0, split_seed=0,
                      data_memory=data_memory, source=str(root))
