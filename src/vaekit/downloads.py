"""Files fetched once into the cache, verified by checksum, written atomically.

A download streams to a temporary file beside its destination (memory holds one chunk, not
the file), is checked against its MD5, and only then renamed into place: an interrupted or
corrupted download never leaves a file that looks like the real one. Mirrors are tried in
order. Archives are unpacked member by member with every name and size checked first: no
member may leave its folder, be anything but a regular file, or be larger than allowed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from .budget import human
from .errors import DataError
from .safefiles import real_folder

CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 (a checksum the publishers give, not security)
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch(urls: list[str], destination: Path, md5: str, *, progress: bool = True) -> list[str]:
    """Download the first of urls whose bytes have this MD5 to destination; returns the
    failures ("URL: why") when none did (destination is then untouched)."""
    from tqdm import tqdm

    destination.parent.mkdir(parents=True, exist_ok=True)
    real_folder(destination.parent, create=True, error=DataError)  # never a planted link
    failures = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name,
                          leave=False, disable=None if progress else True) as bar:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            digest = md5_of(Path(tmp))
            if digest != md5:
                failures.append(f"{url}: checksum {digest} is not {md5}")
                continue
            os.replace(tmp, destination)
            return []
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
            failures.append(f"{url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return failures


def unzip(archive: Path, target: Path, *, prefix: str, max_member: int) -> int:
    """Unpack the regular files under `prefix`/ of a zip into target; returns how many.
    Every member is checked before anything is written: names inside their folder, sizes
    (as declared, and as inflated) within max_member bytes and the disk's free space."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            for member in members:
                name = PurePosixPath(member.filename)
                if name.is_absolute() or ".." in name.parts or not name.parts or \
                        name.parts[0] != prefix:
                    raise DataError(f"{archive}: member {member.filename!r} lies outside "
                                    f"{prefix}/; delete the file and download it again")
                if member.file_size > max_member:
                    raise DataError(f"{archive}: member {member.filename} declares "
                                    f"{human(member.file_size)}, over the {human(max_member)} "
                                    "an image of it may have; delete the file and download it "
                                    "again")
            needed = sum(m.file_size for m in members)
            free = shutil.disk_usage(target.parent).free
            if needed > free:
                raise DataError(f"{archive}: unpacking needs {human(needed)} but {human(free)} "
                                "are free; free some space or set VAEKIT_CACHE elsewhere")
            # Into a temporary folder renamed at the end: a killed unpack looks like nothing.
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                            suffix=".tmp"))
            try:
                for member in members:
                    path = staging.joinpath(*PurePosixPath(member.filename).parts)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with zipped.open(member) as source:
                        data = source.read(max_member + 1)  # never more than the cap
                    if len(data) > max_member:
                        raise DataError(f"{archive}: member {member.filename} inflates past "
                                        f"{human(max_member)}; delete the file and download it "
                                        "again")
                    path.write_bytes(data)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return len(members)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{archive}: not a readable zip file ({exc}); delete it and download it "
                        "again") from None
