"""The decode-once cache of image folders: decoded once (in parallel, each image shrunk as it is
read), checked against the folder on every open, rebuilt when a file changes, never left looking
complete by a killed decode, and mapped rather than copied when the data exceed --data-memory."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaekit import data_cache, image_decode
from vaekit.budget import data_memory_budget, physical_memory
from vaekit.config import TrainConfig
from vaekit.data import load_dataset
from vaekit.errors import ConfigError, DataError
from vaekit.image_decode import Transform, decode, decode_into
from vaekit.image_folder import cache_images, list_image_folder, read_image_folder


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))


def write_images(folder: Path, n: int, size=(30, 24), kind="png", classes: int = 0,
                 seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / f"class{i % classes}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = sub / f"{i:04d}.{kind}"
        Image.fromarray(pixels).save(path, **({"quality": 90} if kind == "jpg" else {}))
        paths.append(path)
    return paths


def mapped_file(address: int) -> str:
    """The file mapped at a memory address of this process ("" for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        start, stop = (int(part, 16) for part in span.split("-"))
        if start <= address < stop:
            return rest[4] if len(rest) == 5 else ""
    return ""


def open_cache(folder: Path, size=8, channels=None, **options):
    files, _, _ = list_image_folder(folder)
    lines: list[str] = []
    cache = cache_images(folder, files, size, channels, log=lines.append, **options)
    return cache, lines


def test_a_second_open_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    write_images(tmp_path / "images", 12)
    first, _ = open_cache(tmp_path / "images")
    assert (first.folder / "meta.json").is_file() and first.shape == (12, 3, 8, 8)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a valid cache must not be decoded again")
    monkeypatch.setattr("vaekit.image_folder.decode_into", no_decoding)
    second, lines = open_cache(tmp_path / "images")
    assert second.meta["build"] == first.meta["build"] and lines == []
    assert np.array_equal(second.images(mapped=True), first.images(mapped=False))


@pytest.mark.parametrize("change", ["added", "removed", "changed"])
def test_a_changed_folder_is_decoded_again_with_a_line_saying_so(tmp_path, change):
    paths = write_images(tmp_path / "images", 6)
    before, _ = open_cache(tmp_path / "images")
    if change == "added":
        write_images(tmp_path / "extra", 1)[0].rename(tmp_path / "images" / "new.png")
    elif change == "removed":
        paths[2].unlink()
    else:
        Image.new("RGB", (30, 24), (255, 0, 0)).save(paths[2])
    after, lines = open_cache(tmp_path / "images")
    assert len(lines) == 1 and f"1 {change}" in lines[0] and "decoding again" in lines[0]
    assert after.meta["build"] != before.meta["build"]
    assert after.shape[0] == {"added": 7, "removed": 5, "changed": 6}[change]
    if change == "changed":
        red = after.images(mapped=False)[2]  # (3, 8, 8)
        assert (red[0] == 255).all() and (red[1:] == 0).all()


def test_a_killed_decode_leaves_no_cache_that_looks_complete(tmp_path, monkeypatch):
    write_images(tmp_path / "images", 10)
    real = image_decode.decode_into

    def killed(out, paths, *args, **kwargs):
        out[:3] = 7  # part of the array written, then the process dies
        raise KeyboardInterrupt
    monkeypatch.setattr("vaekit.image_folder.decode_into", killed)
    with pytest.raises(KeyboardInterrupt):
        open_cache(tmp_path / "images")
    folders = list(data_cache.arrays_dir().iterdir())
    assert len(folders) == 1
    assert sorted(p.name for p in folders[0].iterdir()) == [".lock"]  # no meta, no array
    monkeypatch.setattr("vaekit.image_folder.decode_into", real)
    cache, lines = open_cache(tmp_path / "images")
    assert cache.shape == (10, 3, 8, 8) and lines == []  # 10 images: built without a line
    assert not (cache.images(mapped=False)[:3] == 7).all()


def test_a_damaged_meta_file_means_a_rebuild(tmp_path):
    write_images(tmp_path / "images", 4)
    cache, _ = open_cache(tmp_path / "images")
    (cache.folder / "meta.json").write_text("{\"format\": ")
    again, lines = open_cache(tmp_path / "images")
    assert "damaged" in lines[0] and again.shape == cache.shape


def test_parallel_decoding_gives_the_bytes_of_one_process(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "images", 40, size=(40, 50), kind="jpg")
    transform = Transform(3, 16, 16, size=16)
    monkeypatch.setattr(image_decode, "POOL_FROM", 1)
    monkeypatch.setattr(image_decode, "CHUNK", 7)  # several chunks, the last one short
    alone = np.zeros((40, 3, 16, 16), np.uint8)
    pooled = np.zeros_like(alone)
    assert decode_into(alone, paths, transform, workers=1, progress=False) == {}
    assert decode_into(pooled, paths, transform, workers=2, progress=False) == {}
    assert np.array_equal(alone, pooled) and alone.any()
    from numpy.lib.format import open_memmap  # a file: each worker writes its own rows there

    mapped = open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.uint8, shape=alone.shape)
    assert decode_into(mapped, paths, transform, workers=2, progress=False) == {}
    mapped.flush()
    assert np.array_equal(np.load(tmp_path / "out.npy"), alone)


def test_the_full_decode_is_the_one_older_runs_trained_on(tmp_path):
    """fast=False: decode, centre square crop, bicubic resize, exactly as vaekit did before
    the cache; fast=True (JPEG draft at half scale here) stays within a few grey levels."""
    path = write_images(tmp_path, 1, size=(178, 218), kind="jpg")[0]
    with Image.open(path) as image:
        image = image.convert("RGB")
        top = (218 - 178) // 2
        expected = np.asarray(image.crop((0, top, 178, top + 178)).resize(
            (64, 64), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    full = decode(path, Transform(3, 64, 64, size=64, fast=False))
    assert np.array_equal(full, expected)
    fast = decode(path, Transform(3, 64, 64, size=64, fast=True))
    assert fast.shape == (3, 64, 64)
    # noise images are the hardest case for a reduced-scale decode; smooth photos differ less
    assert np.abs(fast.astype(int) - expected.astype(int)).mean() < 40


def test_a_fixed_crop_then_resize_as_celeba_is_preprocessed(tmp_path):
    path = tmp_path / "face.png"
    pixels = np.zeros((218, 178), np.uint8)
    pixels[35:35 + 148, 15:15 + 148] = 200  # exactly the centred 148 x 148 square
    Image.fromarray(pixels).save(path)
    for fast in (False, True):
        out = decode(path, Transform(1, 64, 64, size=64, crop=148, fast=fast))
        assert (out == 200).all(), fast


def test_mapped_data_are_the_in_memory_data_with_the_same_fingerprint(tmp_path):
    write_images(tmp_path / "images", 30, classes=3)
    held = load_dataset(str(tmp_path / "images"), image_size=8)
    mapped = load_dataset(str(tmp_path / "images"), image_size=8, data_memory="0")
    assert not held.mapped and mapped.mapped and "memory-mapped" in mapped.memory
    for tensor in (mapped.train_x, mapped.test_x):  # views of the file, not copies
        assert mapped_file(tensor.data_ptr()).startswith(str(data_cache.arrays_dir())), tensor
    assert not mapped_file(held.train_x.data_ptr()).endswith(".npy")
    for name in ("train_x", "test_x", "train_y", "test_y"):
        assert torch.equal(getattr(held, name), getattr(mapped, name)), name
    assert mapped.fingerprint() == held.fingerprint()
    recomputed = replace(mapped, known_fingerprint=None)  # hash the mapped bytes themselves
    assert recomputed.fingerprint() == held.fingerprint()
    assert mapped.label_names == held.label_names == ["class0", "class1", "class2"]
    again = load_dataset(str(tmp_path / "images"), image_size=8, data_memory="0")
    assert again.fingerprint() == held.fingerprint()  # the split file is reused


def test_one_process_decodes_while_the_others_wait(tmp_path):
    write_images(tmp_path / "images", 8)
    files, _, _ = list_image_folder(tmp_path / "images")
    builds, results = [], []

    def load():
        cache = cache_images(tmp_path / "images", files, 8, None, log=builds.append)
        results.append(cache.meta["build"])
    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3


def test_bad_images_name_the_file_or_are_skipped_and_listed(tmp_path):
    write_images(tmp_path / "images", 9)
    (tmp_path / "images" / "0004.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as caught:
        load_dataset(str(tmp_path / "images"), image_size=8)
    message = str(caught.value)
    assert "0004.png: not a readable image" in message and "--skip-bad-images" in message
    assert "1 of 9 images could not be used" in message and "\n" not in message
    lines: list[str] = []
    files, _, _ = list_image_folder(tmp_path / "images")
    cache = cache_images(tmp_path / "images", files, 8, None, skip_bad=True, log=lines.append)
    assert cache.kept().tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert len(lines) == 1 and "skipped 1 of 9" in lines[0] and str(cache.skipped_file) in lines[0]
    assert "0004.png" in cache.skipped_file.read_text()
    dataset = load_dataset(str(tmp_path / "images"), image_size=8, skip_bad_images=True)
    assert len(dataset.train_x) + len(dataset.test_x) == 8


def test_folder_rules_still_hold_through_the_cache(tmp_path):
    write_images(tmp_path / "images", 3, size=(8, 8))
    write_images(tmp_path / "other", 1, size=(10, 10))
    (tmp_path / "other" / "0000.png").rename(tmp_path / "images" / "odd.png")
    with pytest.raises(DataError, match=r"differ in size \(8x8 and 10x10\)"):
        read_image_folder(tmp_path / "images", None, None)
    x, y, names = read_image_folder(tmp_path / "images", 8, None)
    assert x.shape == (4, 3, 8, 8) and y is None and names is None


def test_data_memory_takes_sizes_and_auto():
    assert data_memory_budget("auto") == min(physical_memory() // 4, 2**30)
    assert data_memory_budget("0") == 0 and data_memory_budget("2G") == 2 * 2**30
    with pytest.raises(ConfigError, match="--data-memory 'lots' is not a size"):
        TrainConfig(data_memory="lots").validate()


def test_cache_metadata_records_the_files_and_the_transform(tmp_path):
    write_images(tmp_path / "images", 3)
    cache, _ = open_cache(tmp_path / "images", size=8, channels=1)
    meta = json.loads((cache.folder / "meta.json").read_text())
    assert meta["format"] == data_cache.CACHE_FORMAT
    assert meta["transform"] == {"channels": 1, "height": 8, "width": 8, "size": 8,
                                 "crop": None, "fast": True, "background": None}
    assert meta["transparent"] == 0  # images with alpha, composited on the background
    assert meta["files"] == 3 and len(meta["files_sha256"]) == 64
    rows = json.loads((cache.folder / "files.json").read_text())
    assert [row[0] for row in rows] == ["0000.png", "0001.png", "0002.png"]
    assert all(row[1] > 0 and row[2] > 0 for row in rows)


# --- training from the map ----------------------------------------------------------------------

TINY = dict(epochs=2, batch_size=16, hidden=[16], latent_dim=2, progress=False,
            checkpoint_every_minutes=60.0, image_size=8, seed=3)


def test_training_from_the_map_is_training_in_memory_and_resumes_exactly(tmp_path):
    from vaekit.train import train

    write_images(tmp_path / "images", 80, classes=2)
    quiet = (lambda *a, **k: None)
    base = TrainConfig(data=str(tmp_path / "images"), **TINY)
    held = train(replace(base, out=str(tmp_path / "held")), log=quiet)
    mapped = train(replace(base, out=str(tmp_path / "mapped"), data_memory="0", epochs=1),
                   log=quiet)
    # resumed from the map with the epochs raised: the same two epochs, bit for bit
    train(resume=mapped, overrides={"epochs": 2}, log=quiet)
    assert (held / "model.safetensors").read_bytes() == \
        (mapped / "model.safetensors").read_bytes()
    stored = json.loads((mapped / "config.json").read_text())
    assert stored["config"]["data_memory"] == "0"
    held_fingerprint = json.loads((held / "config.json").read_text())["data"]["fingerprint"]
    assert stored["data"]["fingerprint"] == held_fingerprint
    # where the data live is no part of the run: a mapped run resumes in memory too
    train(resume=mapped, overrides={"epochs": 3, "data_memory": "auto"}, log=quiet)


def test_idx_and_uint8_arrays_over_the_budget_are_mapped_too(tmp_path):
    from conftest import write_fake_mnist

    data = write_fake_mnist(tmp_path / "mnist", n_train=40, n_test=10)
    held = load_dataset("mnist", data_dir=str(data))
    mapped = load_dataset("mnist", data_dir=str(data), data_memory="0")
    assert not held.mapped and mapped.mapped
    assert mapped_file(mapped.train_x.data_ptr()).startswith(str(data_cache.arrays_dir()))
    for name in ("train_x", "test_x", "train_y", "test_y"):
        assert torch.equal(getattr(held, name), getattr(mapped, name)), name
    assert replace(mapped, known_fingerprint=None).fingerprint() == held.fingerprint()
    images = np.random.default_rng(0).integers(0, 256, (12, 5, 5), np.uint8)
    np.save(tmp_path / "images.npy", images)
    array = load_dataset(str(tmp_path / "images.npy"), data_memory="0")
    assert array.mapped and torch.equal(
        torch.cat([array.train_x, array.test_x]).sort(0).values,
        torch.from_numpy(images[:, None]).sort(0).values)
    np.save(tmp_path / "reals.npy", np.random.default_rng(1).random((12, 3)))
    reals = load_dataset(str(tmp_path / "reals.npy"), data_memory="0")
    assert not reals.mapped  # real-valued arrays stay in memory: the cache holds uint8 images
