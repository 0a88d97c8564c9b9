"""Folders of images as datasets: the files and their classes, decoded once into the cache.

    FOLDER/*.png                  unlabelled images
    FOLDER/CLASS/**/*.jpg         one class per sub-folder (sorted names: labels 0, 1, ...)

The images are decoded on all cores into the cache (data_cache.py) by image_decode.py; a later
run opens the cache in well under a second. Without --image-size the images must share one
size, and without --channels one kind (grey or colour): both are read from the headers first.
An unreadable image is an error naming it, unless skip_bad (--skip-bad-images): then it is
left out, and one line says how many were and where their list is. Images with transparency
are composited on --background (white unless told), and one line says how many there were.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .budget import check_elements
from .data_cache import Allocation, CachedArray, cached_array, file_listing
from .dataset import Dataset, from_cache
from .errors import DataError
from .image_decode import (
    IMAGE_SUFFIXES,
    Header,
    Transform,
    decode_into,
    read_headers,
    workers_available,
)
from .safefiles import printable


ANNOUNCE_FROM = 1000  # images: fewer decode in a second or two, without a line saying so


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_SUFFIXES = tuple(IMAGE_SUFFIXES)


def list_image_folder(folder: Path) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """(paths of the image files in order, their labels or None, class names or None).

    Paths are strings: for 200,000 files, Path objects alone would take a second or more."""
    base = os.fspath(folder)
    # scandir: the entry types come with the names, not one stat per file; names only, kept
    # in two lists (a tuple per entry would be a third of a 200,000-file listing's memory)
    subfolders, loose = [], []
    with os.scandir(base) as scan:
        for entry in scan:
            name = entry.name
            if entry.is_dir():
                if not name.startswith("."):
                    subfolders.append(name)
            # Not only regular files: a FIFO named x.png must be refused by the decoder.
            elif name.lower().endswith(_SUFFIXES):
                loose.append(name)
    subfolders.sort()
    loose.sort()
    if subfolders and loose:
        raise DataError(f"{folder}: holds both images and class sub-folders; move the loose images "
                        f"(such as {loose[0]}) into a sub-folder")
    if subfolders:
        files, counts = [], []
        for sub in subfolders:
            # strings, not Path objects (a tenth of the memory), in the order sorted Paths have:
            # part by part, which is the order of the text with each separator made "\0"
            found = sorted((str(path) for path in (folder / sub).rglob("*")
                            if path.suffix.lower() in IMAGE_SUFFIXES),
                           key=lambda text: text.replace(os.sep, "\0"))
            files.extend(found)
            counts.append(len(found))
        labels = np.repeat(np.arange(len(subfolders), dtype=np.int64), counts)
        label_names = [printable(sub) for sub in subfolders]  # any bytes -> valid text
    else:
        files, labels, label_names = [os.path.join(base, name) for name in loose], None, None
    if not files:
        raise DataError(f"{folder}: no images found (looked for "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of images")
    return files, labels, label_names


def cache_images(folder: Path, files: list[str], image_size: int | None,
                 channels: int | None, *, crop: int | None = None, fast: bool = True,
                 background: tuple[int, int, int] | None = None,
                 skip_bad: bool = False, source: str | None = None,
                 log: Callable[[str], None] = stderr_line, workers: int | None = None,
                 progress: bool = True) -> CachedArray:
    """The cache entry of these image files (decoding them now if there is none that matches);
    unreadable ones are an error naming the first, unless skip_bad. background: the RGB that
    transparent pixels are composited on (None: alpha dropped, as before --background)."""
    folder = Path(folder)
    request = {"size": image_size, "channels": channels, "crop": crop, "fast": fast}
    if background is not None:  # part of the key; absent, the key of caches made before it
        request["background"] = list(background)
    workers = workers or workers_available()

    def build(allocate: Allocation) -> tuple[dict[int, str], dict]:
        bad: dict[int, str] = {}
        transform_channels, height, width = channels, image_size, image_size
        if channels is None or image_size is None:
            headers = read_headers(files, workers, progress)
            bad = {i: h for i, h in enumerate(headers) if isinstance(h, str)}
            good = [(files[i], h) for i, h in enumerate(headers) if isinstance(h, Header)]
            if good:
                transform_channels = channels or _channels_of(folder, good)
                if image_size is None:
                    width, height = _size_of(folder, good)
        if transform_channels is None:  # every header was unreadable
            transform_channels, height, width = 1, height or 1, width or 1
        transform = Transform(transform_channels, height, width, image_size, crop, fast,
                              background)
        if image_size is not None:  # each worker holds one resized image at a time
            check_elements(f"--image-size {image_size} ({transform_channels} x {image_size} x "
                           f"{image_size} pixels an image, {workers} decoding at once)",
                           math.prod(transform.shape), workers, "choose a smaller --image-size",
                           DataError)
        out = allocate((len(files), *transform.shape))
        # Files with unreadable headers fail again here, cheaply; their header's message stays.
        counts: dict = {}
        bad = {**decode_into(out, files, transform, workers, progress, counts), **bad}
        return bad, {"transform": transform.info(), "transparent": counts["transparent"]}

    cache = cached_array(source or str(folder.resolve()), request,
                         file_listing(files, folder), build, log=log,
                         announce=len(files) >= ANNOUNCE_FROM)
    bad = cache.bad
    if bad:
        first, listed = bad[min(bad)], f"the list is in {cache.skipped_file}"
        if not skip_bad:
            raise DataError(f"{first}, or pass --skip-bad-images to leave it out ({len(bad):,} "
                            f"of {cache.shape[0]:,} images could not be used; {listed})")
        if len(bad) == cache.shape[0]:
            raise DataError(f"{folder}: none of the {len(bad):,} images is readable, e.g. "
                            f"{first}")
        log(f"{folder}: skipped {len(bad):,} of {cache.shape[0]:,} images that could not be "
            f"used; {listed}")
    transparent = cache.meta.get("transparent", 0)  # caches made before --background: unknown
    if transparent:
        log(transparency_line(folder, transparent, cache.shape[0], background))
    return cache


def transparency_line(folder: Path, transparent: int, total: int,
                      background: tuple[int, int, int] | None) -> str:
    """The one line saying what was done with the transparency of `transparent` images."""
    what = f"{folder}: {transparent:,} of {total:,} images have transparency"
    if background is None:
        return (f"{what}; alpha dropped (--background none): transparent areas show the RGB "
                "the files store")
    named = {(255, 255, 255): "white", (0, 0, 0): "black"}.get(tuple(background),
                                                             ",".join(map(str, background)))
    return f"{what}: composited on {named} (--background)"


def _channels_of(folder: Path, good: list[tuple[str, Header]]) -> int:
    grey = {h.grey for _, h in good}
    if len(grey) > 1:
        first_path, first = good[0]
        odd = next(p for p, h in good if h.grey != first.grey)
        kind = (lambda h: "greyscale" if h.grey else "colour")
        raise DataError(f"{folder}: mixes greyscale and colour images "
                        f"({os.path.basename(first_path)} is {kind(first)}, "
                        f"{os.path.basename(odd)} is not); pass --channels 1 or --channels 3")
    return 1 if grey == {True} else 3


def _size_of(folder: Path, good: list[tuple[str, Header]]) -> tuple[int, int]:
    sizes = {(h.width, h.height) for _, h in good}
    if len(sizes) > 1:
        (w1, h1), (w2, h2) = sorted(sizes)[:2]
        raise DataError(f"{folder}: images differ in size ({w1}x{h1} and {w2}x{h2}); pass "
                        "--image-size N to resize them all to N x N")
    return next(iter(sizes))


def load_image_folder(folder: Path, image_size: int | None, channels: int | None, *,
                      test_fraction: float, split_seed: int, skip_bad: bool = False,
                      fast: bool = True, data_memory: str = "auto",
                      background: tuple[int, int, int] | None = None,
                      progress: bool = True) -> Dataset:
    """A folder as a Dataset: seeded split, in memory or mapped (see dataset.from_cache)."""
    files, labels, label_names = list_image_folder(folder)
    cache = cache_images(folder, files, image_size, channels, fast=fast, background=background,
                         skip_bad=skip_bad, progress=progress)
    return from_cache(cache, str(folder), labels, label_names, None,
                      test_fraction=test_fraction, split_seed=split_seed,
                      data_memory=data_memory, source=str(folder.resolve()))


def read_image_folder(folder: Path, image_size: int | None, channels: int | None,
                      fast: bool = True, background: tuple[int, int, int] | None = None
                      ) -> tuple[Tensor, Tensor | None, list[str] | None]:
    """Every image of a folder: uint8 (N, C, H, W) mapped from the cache (nothing is copied
    into memory until used), labels (N,) or None, class names or None."""
    files, labels, label_names = list_image_folder(folder)
    cache = cache_images(folder, files, image_size, channels, fast=fast, background=background)
    with warnings.catch_warnings():  # a copy-on-write map is writable; torch need not warn
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(cache.images(mapped=True))  # (N, C, H, W) uint8, mapped
    y = None if labels is None else torch.from_numpy(labels)
    return x, y, label_names
