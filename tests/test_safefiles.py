"""safefiles: no write or delete through a planted link; special files refused, not read."""

from __future__ import annotations

import os
import socket

import pytest

from vaekit.errors import DataError, RunError
from vaekit.runs import RunLock, prune_checkpoints, remove_leftovers
from vaekit.safefiles import (open_private, open_regular, printable, read_regular, real_folder,
                              remove_tree)


def test_open_private_never_follows_a_link(tmp_path):
    target = tmp_path / "precious"
    target.write_text("mine")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(RunError, match="is a symbolic link"):
        open_private(tmp_path / "link", os.O_RDWR | os.O_CREAT)
    os.symlink(tmp_path / "not-yet", tmp_path / "dangling")
    with pytest.raises(RunError, match="is a symbolic link"):
        open_private(tmp_path / "dangling", os.O_RDWR | os.O_CREAT)
    assert target.read_text() == "mine" and not (tmp_path / "not-yet").exists()


def test_the_lock_refuses_links_and_fifos(tmp_path):
    target = tmp_path / "precious"
    target.write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / ".lock")
    with pytest.raises(RunError, match="symbolic link"):
        RunLock(run).__enter__()
    assert RunLock.holder(run) is None and target.read_text() == "mine"
    (run / ".lock").unlink()
    os.mkfifo(run / ".lock")
    with pytest.raises(RunError, match="FIFO"):
        RunLock(run).__enter__()


def test_real_folder_refuses_links_and_files(tmp_path):
    assert not real_folder(tmp_path / "absent")
    assert real_folder(tmp_path / "made", create=True) and (tmp_path / "made").is_dir()
    os.symlink(tmp_path / "made", tmp_path / "link")
    with pytest.raises(RunError, match="symbolic link"):
        real_folder(tmp_path / "link", create=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="is a file, where vaekit keeps a folder"):
        real_folder(tmp_path / "file")


def test_removing_leftovers_and_pruning_never_follow_links(tmp_path):
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "keep.txt").write_text("mine")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.symlink(outside, run / "checkpoints" / ".staging-x")
    os.symlink(outside, run / "checkpoints" / ".trash-y")
    os.symlink(outside / "deep" / "keep.txt", run / ".config.json.abc.tmp")
    inner = run / "checkpoints" / ".staging-z"
    inner.mkdir()
    os.symlink(outside / "deep", inner / "link-inside")
    removed = remove_leftovers(run)
    assert len(removed) == 4 and not list((run / "checkpoints").iterdir())
    assert (outside / "deep" / "keep.txt").read_text() == "mine"
    os.symlink(outside, run / "checkpoints" / ".staging-w")
    prune_checkpoints(run / "checkpoints", keep=1)
    assert (outside / "deep" / "keep.txt").read_text() == "mine"
    remove_tree(outside / "deep")
    assert not (outside / "deep").exists()


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "folder"])
def test_only_regular_files_are_read(tmp_path, kind):
    path = tmp_path / "data.npy"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
    elif kind == "device":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    words = {"fifo": "FIFO", "socket": "socket", "device": "character device",
             "folder": "folder"}[kind]
    with pytest.raises(DataError, match=f"is a {words}.*, not a regular file"):
        open_regular(path, "the data", DataError)
    (tmp_path / "ok").write_bytes(b"12345")
    assert read_regular(tmp_path / "ok", "x", DataError) == b"12345"
    with pytest.raises(DataError, match="over the limit of 4"):
        read_regular(tmp_path / "ok", "x", DataError, max_bytes=4)


def test_printable_names():
    assert printable("Sandal") == "Sandal" and printable("café") == "café"
    assert printable(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert printable("\ud800x") == "\\ud800x"
    for name in (os.fsdecode(b"\xff\xfe"), "\udcff", "a\ud83d"):
        printable(name).encode("utf-8")


def test_downloads_never_go_through_a_planted_cache_link(tmp_path, monkeypatch):
    from vaekit.data import download_idx

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    os.symlink(elsewhere, tmp_path / "cache" / "mnist")

    def no_network(*args, **kwargs):
        raise AssertionError("nothing may be fetched into a linked cache folder")
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(DataError, match="is a symbolic link"):
        download_idx("mnist")
    assert not list(elsewhere.iterdir())
