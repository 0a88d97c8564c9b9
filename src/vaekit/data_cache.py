"""The decode-once cache: data decoded into a uint8 array file that later runs open at once.

    $VAEKIT_CACHE/arrays/KEY/           KEY: a hash of the source and how it is decoded
        images.npy                      uint8 (N, C, H, W), one row per source file or record
        meta.json                       format, source, request, transform, shape, unreadable
                                        rows, a build id, the digest of the file list
        files.json                      the file list: name, size, mtime_ns of each file
        skipped.txt                     the unreadable files, one message a line (if any)
        split-HASH.npy, split-HASH.json the rows of one train/test split, train rows first, and
                                        the SHA-256 of the split (the Dataset's fingerprint)

meta.json is written last, after images.npy is complete and renamed into place, and is deleted
first when the cache is rebuilt: a decode killed at any point leaves no cache that looks
complete, only temporaries (.images.npy.*.tmp) that the next build removes. A cache is used
only if its file list (names, sizes, modification times) matches the source's now; otherwise
it is rebuilt with one line saying what changed. One process builds while others wait on the
folder's lock (flock), so every torchrun process opens the same file and the page cache holds
one copy for all of them.

Split files exist so that data above the memory budget are two views of one memory map, train
rows then test rows, with no copy in process memory: a seeded split of a folder is a
permutation of its files, and a split file stores it once, in chunks, hashing as it goes.

Torch-free (numpy only).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import jsonio
from .budget import human
from .errors import DataError
from .safefiles import open_private, real_folder, refuse_link, remove_tree

CACHE_FORMAT = "vaekit-array-cache/1"
TMP_SUFFIX = ".tmp"
MAX_META_BYTES = 1 << 30  # about 60 bytes a file: room for 17 million files
GATHER_BYTES = 32 * 2**20  # rows copied per step when a split file is written


def cache_dir() -> Path:
    """Where downloads and caches go: $VAEKIT_CACHE, else $XDG_CACHE_HOME/vaekit, else
    ~/.cache/vaekit."""
    if os.environ.get("VAEKIT_CACHE"):
        return Path(os.environ["VAEKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vaekit"


def arrays_dir() -> Path:
    return cache_dir() / "arrays"


@dataclass
class Listing:
    """The files a cache was decoded from: names (relative to their folder), sizes and
    modification times. A cache holds its digest in meta.json (checked on every open: cheap for
    200,000 files) and the rows in files.json (read only to say what changed).

    Compact on purpose (memory independent of how the names are used): the paths are the
    caller's own list, each name is cut from its path only while it is hashed or written, and
    the sizes and times are two int64 arrays, not a Python int per file."""

    paths: Sequence[str]
    prefix: int  # characters of the root's path (and its slash) that each path starts with
    sizes: np.ndarray  # (N,) int64, -1 for a file that could not be read
    mtimes: np.ndarray  # (N,) int64, nanoseconds

    def __len__(self) -> int:
        return len(self.paths)

    def names(self) -> Iterator[str]:
        return (path[self.prefix:] for path in self.paths)

    def digest(self) -> str:
        digest = hashlib.sha256("\0".join(self.names()).encode("utf-8", "surrogateescape"))
        digest.update(self.sizes.tobytes())
        digest.update(self.mtimes.tobytes())
        return digest.hexdigest()

    def rows(self) -> list[list]:
        return [[name, int(size), int(mtime)]
                for name, size, mtime in zip(self.names(), self.sizes, self.mtimes)]


def file_listing(files: Sequence[str | Path], root: Path | str) -> Listing:
    """The listing of files (paths under root) as they are now. A list of strings is kept as
    it is, not copied: 200,000 paths are about 20 MiB."""
    if not all(isinstance(path, str) for path in files):
        files = [os.fspath(path) for path in files]
    sizes = np.empty(len(files), np.int64)
    mtimes = np.empty(len(files), np.int64)
    for i, path in enumerate(files):
        try:
            info = os.stat(path)
            sizes[i], mtimes[i] = info.st_size, info.st_mtime_ns
        except OSError:  # vanished or unreadable: the decode reports it by name
            sizes[i] = mtimes[i] = -1
    # the files lie under root: cut its prefix and the slash after it
    return Listing(files, len(os.fspath(root).rstrip("/")) + 1, sizes, mtimes)


def empty_listing() -> Listing:
    """The listing of a cache decoded from no files (arrays already in memory)."""
    return file_listing([], "")


def _describe_change(old: list, new: list) -> str:
    before, after = {row[0]: row[1:] for row in old}, {row[0]: row[1:] for row in new}
    added = len(set(after) - set(before))
    removed = len(set(before) - set(after))
    changed = sum(1 for name in set(after) & set(before) if after[name] != before[name])
    parts = [f"{count} {word}" for count, word in ((added, "added"), (removed, "removed"),
                                                   (changed, "changed")) if count]
    return ", ".join(parts) or "the files were reordered"


@dataclass
class Allocation:
    """Where a builder writes: a uint8 array of the shape it asks for, on disk."""

    path: Path
    array: np.memmap | None = None

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        from numpy.lib.format import open_memmap

        nbytes = int(np.prod(shape))
        free = shutil.disk_usage(self.path.parent).free
        if nbytes > free:
            raise DataError(f"{self.path.parent}: the cache needs {human(nbytes)} but the disk has "
                            f"{human(free)} free; free some space or set VAEKIT_CACHE to a "
                            "folder on a larger disk")
        self.array = open_memmap(self.path, mode="w+", dtype=np.uint8, shape=tuple(shape))
        return self.array


# build(allocate) -> (unreadable rows {index: message}, facts for meta.json such as the
# resolved transform); it calls allocate(shape) once and fills the array it returns.
Builder = Callable[[Allocation], tuple[dict[int, str], dict]]


@dataclass
class CachedArray:
    """A complete cache entry: images.npy and what meta.json says about it."""

    folder: Path
    meta: dict

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bad(self) -> dict[int, str]:
        return {int(i): message for i, message in self.meta["bad"]}

    @property
    def skipped_file(self) -> Path:
        return self.folder / "skipped.txt"

    def kept(self) -> np.ndarray:
        """Indices of the readable rows, in order."""
        keep = np.ones(self.shape[0], dtype=bool)
        keep[list(self.bad)] = False
        return np.flatnonzero(keep)

    def images(self, mapped: bool) -> np.ndarray:
        """The whole array: a copy-on-write memory map (pages stay the page cache's until
        written, so processes share them), or read into memory."""
        return _open_array(self.folder / "images.npy", self.shape, mapped)

    def split(self, train_rows: np.ndarray, test_rows: np.ndarray,
              labels: tuple[np.ndarray | None, np.ndarray | None]) -> tuple[np.ndarray, str]:
        """A memory map of rows train_rows then test_rows, and the split's fingerprint:
        SHA-256 of the train rows, the test rows, the train labels and the test labels (as
        `Dataset.fingerprint` hashes the same data held in memory)."""
        train_rows, test_rows = np.asarray(train_rows, np.int64), np.asarray(test_rows, np.int64)
        key = hashlib.sha256(self.meta["build"].encode())
        for part in (train_rows, test_rows, *[y for y in labels if y is not None]):
            key.update(np.ascontiguousarray(part, np.int64).tobytes())
        stem = f"split-{key.hexdigest()[:24]}"
        shape = (len(train_rows) + len(test_rows), *self.shape[1:])
        with _locked(self.folder):
            facts = _read_split_facts(self.folder / f"{stem}.json", self.meta["build"], shape)
            if facts is None:
                facts = self._write_split(stem, shape, np.concatenate([train_rows, test_rows]),
                                          labels)
        return _open_array(self.folder / f"{stem}.npy", shape, True), facts["fingerprint"]

    def _write_split(self, stem: str, shape: tuple[int, ...], rows: np.ndarray,
                     labels: tuple) -> dict:
        source = self.images(mapped=True)
        target = self.folder / f"{stem}.npy"
        with _temporary(target) as tmp:
            out = Allocation(tmp)(shape)
            digest = hashlib.sha256()
            step = max(1, GATHER_BYTES // max(1, int(np.prod(shape[1:]))))
            for start in range(0, len(rows), step):
                block = source[rows[start:start + step]]  # (k, C, H, W): a bounded copy
                out[start:start + len(block)] = block
                digest.update(block)  # a contiguous copy already: hashed in place
            for y in labels:
                if y is not None:
                    digest.update(np.ascontiguousarray(y, np.int64).tobytes())
            _finish(out, tmp, target)
        facts = {"build": self.meta["build"], "shape": list(shape),
                 "fingerprint": digest.hexdigest()}
        _atomic_write_json(self.folder / f"{stem}.json", facts)
        return facts


def cached_array(source: str, request: dict, listing: Listing, build: Builder, *,
                 log: Callable[[str], None], announce: bool = True) -> CachedArray:
    """The cache entry of `source` decoded as `request`, opened, or built now by `build`.

    source: what is decoded (a folder's resolved path, a dataset's name); request: the options
    that decide the decoded array (image size, channels, crop, fast); listing: the files and
    their sizes and times (file_listing), which a cache must match to be used. A rebuild is
    always logged, a first build only if announce (a build of a second or two need not be).
    """
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, source, request], sort_keys=True)
                         .encode()).hexdigest()[:24]
    folder = arrays_dir() / key
    try:
        _make_folder(folder)
        with _locked(folder):
            meta, why = _read_meta(folder, source, request, listing)
            if meta is not None:
                return CachedArray(folder, meta)
            if announce or (folder / "meta.json").exists():
                log(why)
            return _build(folder, source, request, listing, build)
    except OSError as exc:
        raise DataError(f"cannot write the data cache in {folder} ({exc.strerror or exc}); set "
                        "VAEKIT_CACHE to a writable folder with free space") from None


def _build(folder: Path, source: str, request: dict, listing: Listing, build: Builder
           ) -> CachedArray:
    # Everything that could pass for a complete cache goes first: meta.json, then the rest.
    for path in sorted(folder.iterdir()):
        if path.name != ".lock":
            remove_tree(path)
    target = folder / "images.npy"
    with _temporary(target) as tmp:
        allocate = Allocation(tmp)
        bad, facts = build(allocate)
        if allocate.array is None:
            raise AssertionError("the cache builder allocated no array")
        shape = list(allocate.array.shape)
        _finish(allocate.array, tmp, target)
    if bad:
        with open(folder / "skipped.txt", "w", encoding="utf-8", errors="backslashreplace") as f:
            f.writelines(f"{bad[i]}\n" for i in sorted(bad))
    meta = {"format": CACHE_FORMAT, "source": source, "request": request, **facts,
            "shape": shape, "bad": [[i, bad[i]] for i in sorted(bad)],
            "build": uuid.uuid4().hex, "files": len(listing), "files_sha256": listing.digest()}
    _atomic_write_json(folder / "files.json", listing.rows())
    _atomic_write_json(folder / "meta.json", meta)  # last: the mark of a complete cache
    return CachedArray(folder, meta)


def _read_meta(folder: Path, source: str, request: dict, listing: Listing
               ) -> tuple[dict | None, str]:
    """(meta, "") for a complete cache matching the source now, else (None, why not)."""
    what = f"{source}: decoding once {len(listing):,} file(s) into the cache ({folder}); later " \
        "runs open it at once"
    path = folder / "meta.json"
    if not path.exists():
        return None, what
    try:
        meta = jsonio.read_json(path, "a cache's meta.json", error=DataError,
                                max_bytes=MAX_META_BYTES)
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or \
                meta.get("source") != source or meta.get("request") != request:
            raise DataError("not this cache's")
        shape = tuple(meta["shape"])
        _open_array(folder / "images.npy", shape, True)
        {int(i): str(m) for i, m in meta["bad"]}  # noqa: B018 (the shape of the list)
        str(meta["build"])
    except (DataError, KeyError, TypeError, ValueError, OSError):
        return None, f"{source}: the cache in {folder} is damaged; decoding again"
    if meta.get("files_sha256") != listing.digest():
        try:
            before = jsonio.read_json(folder / "files.json", "a cache's file list",
                                      error=DataError, max_bytes=MAX_META_BYTES)
        except DataError:
            before = []
        return None, (f"{source} changed since it was cached "
                      f"({_describe_change(before, listing.rows())}); decoding again")
    return meta, ""


def _read_split_facts(path: Path, build: str, shape: tuple) -> dict | None:
    if not path.exists() or not path.with_suffix(".npy").exists():
        return None
    try:
        facts = jsonio.read_json(path, "a split file's facts", error=DataError)
        if facts.get("build") != build or tuple(facts.get("shape", ())) != shape or \
                not isinstance(facts.get("fingerprint"), str):
            return None
        _open_array(path.with_suffix(".npy"), shape, True)
    except (DataError, AttributeError, OSError, ValueError):
        return None
    return facts


def _open_array(path: Path, shape: tuple, mapped: bool) -> np.ndarray:
    refuse_link(path, DataError)
    array = np.load(path, mmap_mode="c" if mapped else None, allow_pickle=False)
    if array.dtype != np.uint8 or tuple(array.shape) != tuple(shape):
        raise DataError(f"{path}: holds {array.dtype} {array.shape}, not the uint8 {shape} its "
                        "meta.json says; delete the cache folder and run again")
    return array


def _make_folder(folder: Path) -> None:
    folder.parent.parent.mkdir(parents=True, exist_ok=True)
    for level in (folder.parent, folder):  # never a planted link inside the cache
        real_folder(level, create=True, error=DataError)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock: the one process that builds, the others wait for it."""
    fd = open_private(folder / ".lock", os.O_RDWR | os.O_CREAT, error=DataError)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _temporary(target: Path) -> Iterator[Path]:
    """A temporary name beside target, removed unless the block renamed it into place."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _finish(array: np.memmap, tmp: Path, target: Path) -> None:
    array.flush()
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_json(path: Path, value) -> None:
    with _temporary(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(jsonio.dumps(value))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)
