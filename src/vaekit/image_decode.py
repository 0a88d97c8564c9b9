"""Image files -> uint8 arrays of one shape, each image shrunk as it is read, on all cores.

A `Transform` is what every image goes through, in order:

    crop      a centred square: `crop` pixels a side (CelebA's 148), or the largest that fits
    resize    bicubic to size x size (no crop and no resize when size is None)
    alpha     an image with transparency (RGBA, LA, a palette or RGB with a transparent
              colour) is composited on `background` (an RGB triple) before anything else;
              background None drops alpha (the RGB the file stores shows: vaekit before
              --background)
    channels  1 (grey, "L") or 3 (RGB); 16-bit grey keeps its top 8 bits

With `fast` (the default of new runs), the decoder does most of the shrinking: a JPEG is decoded
at 1/2, 1/4 or 1/8 scale in the DCT (Pillow's `draft`) when the crop stays at least `size`
pixels a side, and other images are box-reduced by the largest integer factor that leaves at
least twice the target before the bicubic resize (as Pillow's `reducing_gap=2`). Pixels then
differ slightly from a full-size decode; `fast=False` is the full decode of vaekit before the
cache, which runs trained then need to see the same data.

`decode_into` fills an output array (a memory-mapped file) row by row from a process pool, so
memory holds one chunk of small images per worker, never the decoded full-size images of a
folder. Unreadable files are reported by index with a one-line message naming the file; the
caller decides whether they are an error. Torch-free: the workers import only numpy and Pillow.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .budget import check_bytes
from .errors import DataError
from .safefiles import open_regular

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L"}
CHUNK = 64  # images per task sent to a worker: large enough to amortise the message, small
#             enough that every worker gets many tasks (an even share of the cores to the end)
POOL_FROM = 256  # fewer images decode faster in this process than a pool starts


@dataclass(frozen=True)
class Transform:
    channels: int  # 1 grey | 3 RGB
    height: int  # output rows
    width: int  # output columns
    size: int | None = None  # square output side; None keeps the images' own (equal) size
    crop: int | None = None  # centred crop side before resizing; None: the largest square
    fast: bool = True  # shrink in the decoder (JPEG draft, box reduce) before resizing
    background: tuple[int, int, int] | None = None  # RGB under transparent pixels; None drops

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def info(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Header:
    """What an image's header declares, read without decoding its pixels."""

    width: int
    height: int
    grey: bool


class BadImage(Exception):
    """One file that cannot be used, with the complete one-line message naming it."""


def workers_available() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _open(path: Path, handle):
    from PIL import Image

    with warnings.catch_warnings():
        # Pillow warns about recoverable damage (odd EXIF, short tags); the image decodes, so
        # stay quiet. A decompression bomb is refused, not warned of (Pillow's 89 M pixels).
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(handle)


def _unreadable(path: Path, exc: BaseException) -> BadImage:
    try:
        empty = os.stat(path).st_size == 0
    except OSError:
        empty = False
    reason = "empty file" if empty else (str(exc).split("\n")[0] or type(exc).__name__)
    reason = re.sub(r" <_io\.\w+ name=\d+>", "", reason)  # Pillow names the handle, not the file
    return BadImage(f"{path}: not a readable image ({reason}); remove or replace it")


def _check_pixels(path: Path, image, workers: int) -> None:
    """The pixels the header declares, decoded at full size, against the memory limit (shared
    by the workers decoding at once): a 9000 x 9000 PNG of 79 KB is refused before it inflates."""
    width, height = image.size
    bands = len(image.getbands()) * (4 if image.mode in SIXTEEN_BIT | {"F"} else 1)
    try:
        check_bytes(f"{path} ({width:,} x {height:,} pixels, one of {workers} decoding at once)",
                    width * height * bands * workers, "shrink or remove the image", DataError)
    except DataError as exc:
        raise BadImage(str(exc)) from None


def read_header(path: Path, workers: int = 1) -> Header:
    """Size and colour of one image from its header; BadImage if it cannot be one."""
    try:
        with open_regular(path, "an image", DataError) as handle, _open(path, handle) as image:
            _check_pixels(path, image, workers)
            return Header(image.size[0], image.size[1], image.mode in GREY_MODES)
    except BadImage:
        raise
    except DataError as exc:  # a FIFO, a device, a file that vanished
        raise BadImage(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 (a decoder fed hostile bytes may raise anything)
        raise _unreadable(path, exc) from None


def decode(path: Path, transform: Transform, workers: int = 1) -> np.ndarray:
    """One image through the transform: uint8 (C, H, W); BadImage if it cannot be read."""
    return decode_noting_alpha(path, transform, workers)[0]


def has_alpha(image) -> bool:
    """Whether a (PIL) image has transparency: an alpha band or a transparent colour."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def decode_noting_alpha(path: Path, transform: Transform, workers: int = 1
                        ) -> tuple[np.ndarray, bool]:
    """decode, and whether the image had transparency."""
    try:
        with open_regular(path, "an image", DataError) as handle, _open(path, handle) as image:
            _check_pixels(path, image, workers)
            transparent = has_alpha(image)
            with warnings.catch_warnings():  # as in _open
                warnings.simplefilter("ignore")
                array = _transformed(image, transform)
    except BadImage:
        raise
    except DataError as exc:
        raise BadImage(str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from None
    if array.shape != transform.shape:
        raise BadImage(f"{path}: {array.shape[2]}x{array.shape[1]} pixels, not the "
                       f"{transform.width}x{transform.height} of the other images; pass "
                       "--image-size N to resize them all to N x N")
    return array, transparent


def _crop_box(width: int, height: int, transform: Transform,
              scale: float = 1.0) -> tuple[int, int, int, int]:
    """The centred crop, in the pixels of the image shrunk by `scale` (after a JPEG draft)."""
    side = min(width, height) if transform.crop is None else transform.crop
    if side > width or side > height:
        raise ValueError(f"{width}x{height} pixels, smaller than the crop of {side}")
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    return box if scale == 1.0 else tuple(round(v * scale) for v in box)


def _transformed(image, transform: Transform) -> np.ndarray:
    from PIL import Image

    size, mode = transform.size, ("L" if transform.channels == 1 else "RGB")
    width, height = image.size
    if size is None or (image.size == (size, size) and transform.crop is None):
        image.load()
        return _to_array(_converted(image, transform.channels, transform.background),
                         transform.channels)
    side = min(width, height) if transform.crop is None else transform.crop
    if transform.fast and image.format == "JPEG":
        # draft picks the largest DCT scale (1/2, 1/4, 1/8) keeping the image at least the
        # requested size: the crop then keeps at least `size` pixels a side.
        image.draft(mode, (math.ceil(size * width / side), math.ceil(size * height / side)))
    image.load()
    scale = image.size[0] / width  # 1, or 1/2, 1/4, 1/8 after a draft
    # Crop, then resize (torchvision's CenterCrop, Resize): no pixel outside the crop is used.
    # Without fast this is vaekit's decode before the cache, kept for the runs it trained.
    image = _converted(image, transform.channels, transform.background).crop(_crop_box(width, height, transform, scale))
    return _to_array(image.resize((size, size), Image.Resampling.BICUBIC,
                                  reducing_gap=2.0 if transform.fast else None),
                     transform.channels)


def _converted(image, channels: int, background: tuple[int, int, int] | None = None):
    from PIL import Image

    if background is not None and has_alpha(image):
        # composited before any resize, so edges blend with the background, not stored RGB
        layer = image.convert("RGBA")
        canvas = Image.new("RGBA", layer.size, (*background, 255))
        canvas.alpha_composite(layer)
        image = canvas.convert("RGB")
    if image.mode in SIXTEEN_BIT:  # 16-bit grey: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def _to_array(image, channels: int) -> np.ndarray:
    image = _converted(image, channels)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)  # (C, H, W)


# --- many files, on all cores -------------------------------------------------------------------


def _header_chunk(task: tuple[int, Sequence[str], int]) -> list[Header | str]:
    start, paths, workers = task
    out: list[Header | str] = []
    for path in paths:
        try:
            out.append(read_header(Path(path), workers))
        except BadImage as exc:
            out.append(str(exc))
    return out


# A worker's view of the output file, opened once per worker: it writes its rows there itself,
# so the pixels never travel through the pool's pipes (a copy and two pickles per image).
_TARGETS: dict[tuple, np.memmap] = {}


def _target(spec: tuple[str, int, tuple]) -> np.memmap:
    if spec not in _TARGETS:
        filename, offset, shape = spec
        _TARGETS.clear()
        _TARGETS[spec] = np.memmap(filename, dtype=np.uint8, mode="r+", offset=offset,
                                   shape=shape)
    return _TARGETS[spec]


def _decode_chunk(task: tuple[int, Sequence[str], Transform, int, tuple | None]
                  ) -> tuple[int, np.ndarray | None, list[tuple[int, str]], int]:
    start, paths, transform, workers, target = task
    block = np.zeros((len(paths), *transform.shape), dtype=np.uint8)  # (k, C, H, W)
    bad, transparent = [], 0
    for i, path in enumerate(paths):
        try:
            block[i], alpha = decode_noting_alpha(Path(path), transform, workers)
            transparent += alpha
        except BadImage as exc:
            bad.append((start + i, str(exc)))
    if target is None:
        return start, block, bad, transparent
    _target(target)[start:start + len(paths)] = block
    return start, None, bad, transparent


def _chunks(paths: Sequence[str | Path], *extra) -> Iterator[tuple]:
    for start in range(0, len(paths), CHUNK):
        yield (start, [str(p) for p in paths[start:start + CHUNK]], *extra)


def _mapped(function: Callable, tasks: Iterator[tuple], workers: int, n: int) -> Iterator:
    """function over tasks, in order: in this process, or in a pool of `workers` processes."""
    if workers <= 1 or n < POOL_FROM:
        yield from map(function, tasks)
        return
    import multiprocessing

    # spawn, not fork: the parent holds torch's thread pools, which a forked child must not use
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(function, tasks)


def _bar(n: int, what: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=n, unit="img", desc=what, leave=False, dynamic_ncols=True,
                disable=None if progress else True)  # None: shown on a terminal only


def read_headers(paths: Sequence[str | Path], workers: int, progress: bool = True
                 ) -> list[Header | str]:
    """The header of each file, or the one-line message saying why it is unusable."""
    out: list[Header | str] = []
    with _bar(len(paths), "reading headers", progress) as bar:
        for part in _mapped(_header_chunk, _chunks(paths, workers), workers, len(paths)):
            out.extend(part)
            bar.update(len(part))
    return out


def decode_into(out: np.ndarray, paths: Sequence[str | Path], transform: Transform, workers: int,
                progress: bool = True, counts: dict | None = None) -> dict[int, str]:
    """Decode paths[i] into out[i] (uint8 (N, C, H, W)); returns {index: message} of the files
    that could not be read (their rows stay zero). Into a memory map of a file (np.memmap),
    each worker writes its rows itself. counts, if given, gets "transparent": the number of
    images that had transparency."""
    pooled = workers > 1 and len(paths) >= POOL_FROM
    target = (out.filename, out.offset, out.shape) if pooled and \
        isinstance(out, np.memmap) and out.filename else None
    bad: dict[int, str] = {}
    with _bar(len(paths), "decoding images", progress) as bar:
        transparent = 0
        for start, block, failed, alpha in _mapped(
                _decode_chunk, _chunks(paths, transform, workers, target), workers, len(paths)):
            transparent += alpha
            if block is not None:
                out[start:start + len(block)] = block
            bad.update(failed)
            bar.update(min(CHUNK, len(paths) - start))
    if counts is not None:
        counts["transparent"] = transparent
    return bad
