"""Property-based tests of the loaders against hostile files (hypothesis), one per loader:
sizes a header promises are checked against the memory limit before anything is allocated,
label columns of any values give bounded class lists, and folder names of any bytes give
printable class names. Each either loads exactly or is refused with a one-line DataError."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vaekit.data import MAX_CLASSES, load_array_file, read_idx, read_image_folder
from vaekit.errors import DataError

LIMIT = 2**16  # VAEKIT_MEMORY_LIMIT for these tests: 64 KiB
settings.register_profile("hostile", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def small_memory_limit(monkeypatch):
    monkeypatch.setenv("VAEKIT_MEMORY_LIMIT", str(LIMIT))


def one_line(error: DataError) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


@settings(settings.get_profile("hostile"))
@given(dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3),
       body=st.integers(0, 300))
def test_idx_header_sizes_are_checked_before_reading(dims, body):
    header = bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x-idx-ubyte"
        path.write_bytes(header + bytes(body))
        promised = int(np.prod(dims, dtype=object))
        try:
            array = read_idx(path)
        except DataError as exc:
            message = one_line(exc)
            if promised > LIMIT:
                assert "memory limit" in message
            else:
                assert promised != body or promised == 0
        else:
            assert 0 < promised == body <= LIMIT and array.shape == tuple(dims)


@settings(settings.get_profile("hostile"))
@given(shape=st.lists(st.integers(0, 10**12), min_size=1, max_size=3),
       dtype=st.sampled_from(["<f4", "<f8", "|u1", "<i8"]), body=st.integers(0, 200))
def test_npy_header_sizes_are_checked_before_allocating(shape, dtype, body):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.npy"
        header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            handle.write(bytes(body))
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        try:
            dataset = load_array_file(path, 0.5, 0)
        except DataError as exc:
            if nbytes > LIMIT:
                assert "memory limit" in one_line(exc)
            else:
                one_line(exc)
        else:
            assert nbytes <= body and len(dataset.train_x) + len(dataset.test_x) == shape[0]


@settings(settings.get_profile("hostile"))
@given(labels=st.lists(st.integers(0, 10**15), min_size=2, max_size=12))
def test_csv_label_columns_of_any_size_give_bounded_classes(labels):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.csv"
        path.write_text("label,x\n" + "".join(f"{v},{i}\n" for i, v in enumerate(labels)))
        dataset = load_array_file(path, 0.5, 0)
    names = dataset.label_names
    assert len(names) <= max(MAX_CLASSES, len(set(labels)))
    if max(labels) >= MAX_CLASSES:  # mapped sparsely: one class per distinct value, in order
        assert names == [str(v) for v in sorted(set(labels))]
    else:
        assert names == [str(v) for v in range(max(labels) + 1)]
    # Every example keeps its own label, through the split: x holds the row number.
    for x, y in ((dataset.train_x, dataset.train_y), (dataset.test_x, dataset.test_y)):
        for row, index in zip(x[:, 0].tolist(), y.tolist()):
            assert names[index] == str(labels[int(row)])


names_as_bytes = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
    and not b.startswith(b"."))


@settings(settings.get_profile("hostile"), max_examples=30)
@given(names=st.lists(names_as_bytes, min_size=1, max_size=3, unique=True))
def test_class_folders_of_any_bytes_give_printable_names(names):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for i, name in enumerate(names):
            sub = Path(os.fsdecode(root / os.fsdecode(name)))
            sub.mkdir()
            Image.new("L", (4, 4), 40 * i).save(sub / "0.png")
        _, y, label_names = read_image_folder(root, None, None)
    assert len(label_names) == len(names)
    for shown in label_names:
        shown.encode("utf-8")  # printable and sendable as JSON: no lone surrogates
    expected = sorted(names, key=os.fsdecode)
    for raw, shown in zip(expected, label_names):
        try:
            assert shown == raw.decode("utf-8")  # valid names are unchanged
        except UnicodeDecodeError:
            assert "\\x" in shown
    assert sorted(y.tolist()) == list(range(len(names)))
