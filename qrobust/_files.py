"""File helpers shared by every wing: bounded reads of regular files, atomic writes, hashing.

A path a user hands qrobust can be anything: a FIFO (a read would block forever), /dev/zero through a
symlink (a read would never end), a directory. ``read_bounded`` refuses everything but a regular file
under a size limit, before opening it for reading, and names the limit in the message.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from qrobust.errors import InvalidArgument, show

MiB = 1 << 20


def check_regular_file(path: str | Path, what: str, limit: int | None = None) -> Path:
    """``path`` if it is a regular file (after symlinks) no larger than ``limit`` bytes."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise InvalidArgument(f"{what} {show(str(path), 200)}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(f"{what} {show(str(path), 200)}: not a regular file")
    if limit is not None and info.st_size > limit:
        raise InvalidArgument(f"{what} {show(str(path), 200)}: {info.st_size} bytes, over the limit of {limit} bytes")
    return path


def read_bounded(path: str | Path, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (also if it grows while being read)."""
    path = check_regular_file(path, what, limit)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped for a FIFO after the check
            raise InvalidArgument(f"{what} {show(str(path), 200)}: not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise InvalidArgument(f"{what} {show(str(path), 200)}: over the limit of {limit} bytes")
    return data


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (memory does not grow with the file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` whose name carries this process id (see ``remove_stale``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write via a temporary file and a rename: readers see the old file or the new one, never half."""
    write_set({Path(path): data})


def write_set(files: dict[Path, str | bytes]) -> None:
    """Write several files so that a failure leaves every old file in place: all temporary files are
    written and synced first, then renamed in order. A failure is raised as OSError naming the file."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            fd, tmp = _temporary(path)
            staged.append((tmp, path))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is for everyone who reads the folder
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def remove_stale(directory: str | Path) -> list[Path]:
    """Remove temporary files that a killed qrobust process left in ``directory`` (their pid is gone)."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)  # .<name>.<pid>.<random>.tmp
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
            continue  # alive: maybe a concurrent run
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def append_text(path: Path, text: str) -> None:
    """Append to a file others write too (a CI step summary), in one write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
