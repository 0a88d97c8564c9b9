"""Files of run folders and caches, opened so that no planted link or special file can hurt.

Writing or deleting: a symbolic link where vaekit expects its own file or folder is refused in
one line (O_NOFOLLOW, lstat), never followed, so a link cannot make vaekit truncate or delete a
file outside the run. Reading: only regular files are opened, and they are opened non-blocking
after a stat, so a FIFO, a device or a socket named as data or listed in a manifest is refused
at once instead of hanging the process (possibly while it holds the run's lock).

Torch-free: the config, the JSON reader and the data loaders use it.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .errors import RunError

_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"))


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words ("a FIFO (named pipe)", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def link_refused(path: Path) -> str:
    return (f"{path} is a symbolic link, and vaekit never writes or deletes through a link in a "
            f"run folder or cache: remove the link (rm {path}) and run again")


def refuse_link(path: Path, error=RunError) -> None:
    """Raise `error` if `path` itself is a symbolic link (whatever it points to)."""
    if os.path.islink(path):
        raise error(link_refused(Path(path)))


def real_folder(path: Path, *, create: bool = False, error=RunError) -> bool:
    """Whether `path` is a folder and not a link to one; with create, make it if absent.

    A link or a non-folder at `path` is refused: writing into it would write somewhere else.
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        if not create:
            return False
        try:
            os.mkdir(path)
        except FileExistsError:  # raced with another creator: check what is there now
            return real_folder(path, error=error)
        return True
    if stat.S_ISLNK(mode):
        raise error(link_refused(path))
    if not stat.S_ISDIR(mode):
        raise error(f"{path} is {kind_of(mode)}, where vaekit keeps a folder; move it away")
    return True


def open_private(path: Path, flags: int, mode: int = 0o666, error=RunError) -> int:
    """os.open without following a final symbolic link, non-blocking; regular files only."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError:
        if os.path.islink(path):  # ELOOP, or EMLINK on some systems
            raise error(link_refused(Path(path))) from None
        raise
    file_mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(file_mode):
        os.close(fd)
        raise error(f"{path} is {kind_of(file_mode)}, not a regular file; remove it and run "
                    "again")
    return fd


def remove_tree(path: Path) -> None:
    """Delete a file, a link (the link only) or a folder (never following links inside)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        # rmtree refuses a link at the top and unlinks, never follows, links inside.
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def check_regular(path: Path, what: str, error) -> os.stat_result:
    """stat (following links, which a user may give on purpose) and refuse anything but a file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc}); check the path") \
            from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is {kind_of(info.st_mode)}, not a regular file; give {what} as a "
                    "regular file")
    return info


def open_regular(path: Path, what: str, error):
    """A binary file object for reading a regular file, checked before and after opening.

    Opened non-blocking: if a FIFO replaces the file between the stat and the open, the open
    returns at once and the fstat below refuses it.
    """
    check_regular(path, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc}); check the path") \
            from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path} is {kind_of(mode)}, not a regular file; give {what} as a regular "
                    "file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, what: str, error, max_bytes: int | None = None,
                 fix: str = "it was not written by vaekit, restore the original") -> bytes:
    """The bytes of a regular file, refusing one over max_bytes before reading it."""
    with open_regular(path, what, error) as handle:
        size = os.fstat(handle.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise error(f"{path}: {what} is {size:,} bytes, over the limit of {max_bytes:,}; "
                        f"{fix}")
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:  # grew while being read
        raise error(f"{path}: {what} is over the limit of {max_bytes:,} bytes; {fix}")
    return data


def printable(name: str) -> str:
    """A file name as valid Unicode text, whatever its bytes.

    Linux names are bytes; Python turns those that are not UTF-8 into lone surrogates, which
    cannot be printed, encoded as UTF-8 or sent as JSON. They are shown as \\xNN escapes
    instead ("caf\\xe9" for the Latin-1 bytes of "café"); valid names are returned unchanged.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
