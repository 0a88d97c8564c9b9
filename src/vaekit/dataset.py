"""The Dataset: a train/test split of raw tensors, held in memory or mapped from the cache.

Small data are tensors in process memory. Data above the memory budget (`--data-memory`,
budget.data_memory_budget) are two views of one memory-mapped split file of the cache
(data_cache.py): train rows, then test rows. Either way train_x and test_x are uint8 (or
float32) tensors that training indexes with index_select, so the batch path has no
per-example Python, and a mapped run computes exactly what an in-memory run computes: the same
rows in the same order, with the same fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .budget import data_memory_budget, human, memory_limit
from .errors import DataError
from .randomness import derive_seed, seeded_generator


@dataclass
class Dataset:
    """A train/test split; x raw (see data.py), y int64 labels or None."""

    name: str
    kind: str  # "image8" | "real"
    train_x: Tensor  # (N_train, *shape)
    test_x: Tensor  # (N_test, *shape)
    train_y: Tensor | None = None  # (N_train,)
    test_y: Tensor | None = None  # (N_test,)
    label_names: list[str] | None = None
    source: str = ""
    # Set for data mapped from the cache: the SHA-256 its split file recorded when written,
    # which is what fingerprint() would compute (hashing gigabytes again would take seconds).
    known_fingerprint: str | None = field(default=None, repr=False)
    memory: str = "in memory"  # or "memory-mapped from FILE"
    # The names of the features of tabular data (a CSV's header), for pictures; None elsewhere.
    feature_names: list[str] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def mapped(self) -> bool:
        return self.known_fingerprint is not None

    def fingerprint(self) -> str:
        """SHA-256 of the raw data, so a run can tell when its dataset has changed."""
        if self.known_fingerprint is not None:
            return self.known_fingerprint
        digest = hashlib.sha256()
        for tensor in (self.train_x, self.test_x, self.train_y, self.test_y):
            if tensor is not None:
                digest.update(tensor.contiguous().numpy())  # the buffer itself, no copy
        return digest.hexdigest()

    def info(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "n_train": len(self.train_x), "n_test": len(self.test_x),
                "label_names": self.label_names, "source": self.source,
                "fingerprint": self.fingerprint(),
                **({"feature_names": self.feature_names} if self.feature_names else {})}


def split_indices(name: str, n: int, test_fraction: float, split_seed: int
                  ) -> tuple[Tensor, Tensor]:
    """The seeded random train/test split of n examples: (train indices, test indices), each
    sorted, for data without a split of their own."""
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 1:
        raise DataError(f"{name}: {n} example(s) are too few to hold out a test set; add data "
                        "(at least 2 examples) or lower --test-fraction")
    order = torch.randperm(n, generator=seeded_generator(derive_seed(split_seed, "split")))
    return order[n_test:].sort().values, order[:n_test].sort().values


def validation_indices(n_train: int, fraction: float, split_seed: int) -> tuple[Tensor, Tensor]:
    """The seeded split of a training split's n_train rows into rows trained on and rows held
    out for validation (early stopping): (train positions, validation positions), each sorted.
    Independent of the train/test split's permutation, and of --seed, like the test split."""
    n_validation = max(1, round(n_train * fraction))
    if n_train - n_validation < 1:
        raise DataError(f"{n_train} training example(s) are too few to hold out a validation "
                        "set; add data or pass --validation-fraction 0 --patience 0")
    order = torch.randperm(n_train, generator=seeded_generator(
        derive_seed(split_seed, "validation")))
    return order[n_validation:].sort().values, order[:n_validation].sort().values


def split_dataset(name: str, kind: str, x: Tensor, y: Tensor | None,
                  label_names: list[str] | None, test_fraction: float, split_seed: int,
                  source: str) -> Dataset:
    """A seeded random train/test split of data held in memory."""
    train_idx, test_idx = split_indices(name, len(x), test_fraction, split_seed)
    pick = (lambda t, idx: None if t is None else t[idx].contiguous())
    return Dataset(name, kind, pick(x, train_idx), pick(x, test_idx), pick(y, train_idx),
                   pick(y, test_idx), label_names, source)


def fits_in_memory(nbytes: int, data_memory: str) -> bool:
    """Whether data of nbytes are held in memory (else mapped): within --data-memory, shared
    by the processes torchrun starts on this machine (each would hold its own copy; a map is
    one copy in the page cache for all), and within the memory limit of one allocation."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return nbytes * local_processes <= data_memory_budget(data_memory) and \
        nbytes <= memory_limit()


def from_cache(cache, name: str, labels: np.ndarray | None, label_names: list[str] | None,
               split: tuple[np.ndarray, np.ndarray] | None, *, test_fraction: float,
               split_seed: int, data_memory: str, source: str) -> Dataset:
    """The Dataset of a cache entry's readable rows (data_cache.CachedArray).

    labels: one per row of the cache (or None); split: (train rows, test rows) of the cache
    for data with a split of their own, else the seeded split of the readable rows.
    """
    kept = cache.kept()
    if split is None:
        train_pos, test_pos = split_indices(name, len(kept), test_fraction, split_seed)
        train_rows, test_rows = kept[train_pos.numpy()], kept[test_pos.numpy()]
    else:
        bad = set(cache.bad)
        train_rows, test_rows = ([r for r in rows if r not in bad] for rows in split)
        train_rows, test_rows = np.asarray(train_rows, np.int64), np.asarray(test_rows, np.int64)
    as_labels = (lambda rows: None if labels is None else
                 torch.from_numpy(np.ascontiguousarray(labels[rows], np.int64)))
    train_y, test_y = as_labels(train_rows), as_labels(test_rows)
    row_bytes = int(np.prod(cache.shape[1:]))
    nbytes = row_bytes * (len(train_rows) + len(test_rows))
    if fits_in_memory(nbytes, data_memory):
        images = cache.images(mapped=True)  # gathered from the map: one copy in memory, not two
        return Dataset(name, "image8", torch.from_numpy(images[train_rows]),  # (N_train, C, H, W)
                       torch.from_numpy(images[test_rows]), train_y, test_y, label_names, source)
    rows, fingerprint = cache.split(train_rows, test_rows, (
        None if train_y is None else train_y.numpy(), None if test_y is None else test_y.numpy()))
    with warnings.catch_warnings():  # a copy-on-write map is writable; torch need not warn
        warnings.simplefilter("ignore", UserWarning)
        mapped = torch.from_numpy(rows)  # (N, C, H, W) uint8, pages of the page cache
    n_train = len(train_rows)
    return Dataset(name, "image8", mapped[:n_train], mapped[n_train:], train_y, test_y,
                   label_names, source, known_fingerprint=fingerprint,
                   memory=f"memory-mapped ({human(nbytes)} over --data-memory {data_memory}) "
                   f"from {cache.folder}")


def mapped_if_over_budget(dataset: Dataset, data_memory: str) -> Dataset:
    """An image dataset read into memory (IDX files, a uint8 .npy) over --data-memory: written
    once into the cache, train rows then test rows, and returned as two views of its memory map
    (the copy in memory is then dropped: processes on one machine share the page cache's)."""
    from .data_cache import cached_array, empty_listing

    nbytes = dataset.train_x.numel() + dataset.test_x.numel()
    if dataset.kind != "image8" or dataset.mapped or fits_in_memory(nbytes, data_memory):
        return dataset
    fingerprint = dataset.fingerprint()
    n_train = len(dataset.train_x)

    def build(allocate):
        out = allocate((n_train + len(dataset.test_x), *dataset.shape))
        out[:n_train] = dataset.train_x.numpy()
        out[n_train:] = dataset.test_x.numpy()
        return {}, {}

    # Keyed by the data's own hash: the same data map to the same file, wherever they came from.
    cache = cached_array(f"data:{fingerprint}", {}, empty_listing(), build,
                         log=lambda line: None, announce=False)
    with warnings.catch_warnings():  # a copy-on-write map is writable; torch need not warn
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.from_numpy(cache.images(mapped=True))  # (N, C, H, W) uint8
    return Dataset(dataset.name, "image8", rows[:n_train], rows[n_train:], dataset.train_y,
                   dataset.test_y, dataset.label_names, dataset.source,
                   known_fingerprint=fingerprint,
                   memory=f"memory-mapped ({human(nbytes)} over --data-memory {data_memory}) "
                   f"from {cache.folder}")
