"""cifar10 and celeba by name: read from small files these tests write in the real formats
(CIFAR-10's binary records, CelebA's aligned JPEGs and partition list), found in --data-dir or
the cache, and downloaded (from file:// addresses here) only when the checksum matches."""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaekit import image_datasets
from vaekit.data import load_dataset
from vaekit.errors import DataError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))


def cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    raw = b"".join(bytes([labels[i]]) + images[i].tobytes() for i in range(n))  # R, G, B planes
    return raw, images, labels


def write_cifar(folder: Path, per_file: int = 4, test: int = 3) -> tuple[np.ndarray, ...]:
    bins = folder / "cifar-10-batches-bin"
    bins.mkdir(parents=True)
    parts = []
    for i, name in enumerate(image_datasets.CIFAR_TRAIN + image_datasets.CIFAR_TEST):
        raw, images, labels = cifar_records(test if name == "test_batch.bin" else per_file, i)
        (bins / name).write_bytes(raw)
        parts.append((images, labels))
    train = np.concatenate([p[0] for p in parts[:5]]), np.concatenate([p[1] for p in parts[:5]])
    return (*train, parts[5][0], parts[5][1])


def test_cifar10_reads_the_binary_records(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar(tmp_path / "data")
    data = load_dataset("cifar10", data_dir=str(tmp_path / "data"))
    assert data.shape == (3, 32, 32) and data.label_names[0] == "airplane"
    assert torch.equal(data.train_x, torch.from_numpy(train_x))
    assert torch.equal(data.test_x, torch.from_numpy(test_x))
    assert data.train_y.tolist() == train_y.tolist() and data.test_y.tolist() == test_y.tolist()
    mapped = load_dataset("cifar10", data_dir=str(tmp_path / "data"), data_memory="0")
    assert mapped.mapped and torch.equal(mapped.train_x, data.train_x)
    assert mapped.fingerprint() == data.fingerprint()


@pytest.mark.parametrize("damage, words", [
    ("short", "not a whole number of CIFAR-10 records"),
    ("label", "has label 12, not a CIFAR-10 class"),
    ("python", "not the Python version"),
])
def test_cifar10_damage_is_one_line(tmp_path, damage, words):
    write_cifar(tmp_path / "data")
    first = tmp_path / "data" / "cifar-10-batches-bin" / "data_batch_1.bin"
    if damage == "short":
        first.write_bytes(first.read_bytes()[:-5])
    elif damage == "label":
        raw = bytearray(first.read_bytes())
        raw[0] = 12
        first.write_bytes(bytes(raw))
    else:  # the pickled Python version's names: never opened
        for path in first.parent.iterdir():
            path.rename(path.with_suffix(""))
    with pytest.raises(DataError, match=words):
        load_dataset("cifar10", data_dir=str(tmp_path / "data"))


def cifar_archive(tmp_path: Path) -> Path:
    write_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    return archive


def test_cifar10_is_downloaded_only_with_the_right_checksum(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path)
    monkeypatch.setattr(image_datasets, "CIFAR_URL", archive.as_uri())
    monkeypatch.setattr(image_datasets, "CIFAR_MD5", "0" * 32)
    with pytest.raises(DataError, match="checksum"):
        load_dataset("cifar10")
    assert not list((tmp_path / "cache" / "cifar10").glob("*.tar.gz"))  # nothing kept
    monkeypatch.setattr(image_datasets, "CIFAR_MD5",
                        hashlib.md5(archive.read_bytes()).hexdigest())
    data = load_dataset("cifar10")
    assert len(data.train_x) == 20 and len(data.test_x) == 3
    assert (tmp_path / "cache" / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin").is_file()


def write_celeba(folder: Path, partitions=(0, 0, 0, 0, 1, 2)) -> None:
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    lines = []
    for i, part in enumerate(partitions, 1):
        pixels = np.zeros((218, 178, 3), np.uint8)
        pixels[35:35 + 148, 15:15 + 148] = (20 * i, 100, 200)  # the centred 148-pixel face
        Image.fromarray(pixels).save(images / f"{i:06d}.jpg", quality=95)
        lines.append(f"{i:06d}.jpg {part}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_celeba_is_cropped_to_148_resized_to_64_and_split_by_its_partition(tmp_path):
    write_celeba(tmp_path / "celeba")
    data = load_dataset("celeba", data_dir=str(tmp_path))  # the folder above celeba/ works too
    assert data.shape == (3, 64, 64) and len(data.train_x) == 4 and len(data.test_x) == 1
    face = data.test_x[0].float()  # image 6: colour (120, 100, 200) everywhere after the crop
    assert torch.allclose(face.mean((1, 2)), torch.tensor([120.0, 100.0, 200.0]), atol=4)
    assert data.train_y is None and data.label_names is None
    small = load_dataset("celeba", data_dir=str(tmp_path / "celeba"), image_size=16)
    assert small.shape == (3, 16, 16)


def test_celeba_missing_files_and_bad_partition_lists_are_one_line(tmp_path):
    write_celeba(tmp_path / "celeba")
    (tmp_path / "celeba" / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(DataError, match="000002.jpg: listed in list_eval_partition.txt"):
        load_dataset("celeba", data_dir=str(tmp_path / "celeba"))
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg seven\n")
    with pytest.raises(DataError, match="line 1 is '000001.jpg seven'"):
        load_dataset("celeba", data_dir=str(tmp_path / "celeba"))
    with pytest.raises(DataError, match="no img_align_celeba/ folder"):
        load_dataset("celeba", data_dir=str(tmp_path / "nowhere"))


def test_celeba_downloads_and_unpacks_safely(tmp_path, monkeypatch):
    write_celeba(tmp_path / "src")
    archive = tmp_path / "img_align_celeba.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((tmp_path / "src" / "img_align_celeba").iterdir()):
            zipped.write(path, f"img_align_celeba/{path.name}")
    partition = tmp_path / "src" / "list_eval_partition.txt"
    files = {"img_align_celeba.zip": archive, "list_eval_partition.txt": partition}
    monkeypatch.setattr(image_datasets, "DRIVE", "")
    monkeypatch.setattr(image_datasets, "CELEBA_FILES", {
        name: (path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest())
        for name, path in files.items()})
    data = load_dataset("celeba")
    assert len(data.train_x) == 4 and not (tmp_path / "cache" / "celeba" / archive.name).exists()

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zipped:
        zipped.writestr("img_align_celeba/000001.jpg", b"x")
        zipped.writestr("../outside.txt", b"x")
    from vaekit.downloads import unzip
    with pytest.raises(DataError, match="lies outside img_align_celeba/"):
        unzip(evil, tmp_path / "unpacked", prefix="img_align_celeba", max_member=2**20)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "unpacked").exists()
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("img_align_celeba/000001.jpg", bytes(3 * 2**20))
    with pytest.raises(DataError, match="declares 3.0 MiB"):
        unzip(big, tmp_path / "unpacked", prefix="img_align_celeba", max_member=2**20)
