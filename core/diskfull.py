"""Full disks: recognise the error, describe the free space, keep a small reserve (stdlib only).

A write can fail for lack of space in many shapes: ``OSError`` ENOSPC/EDQUOT (and EIO, which
network and FUSE filesystems report for the same), SQLite's SQLITE_FULL / SQLITE_IOERR, or any of
those wrapped by a library (``raise ... from exc``). ``is_disk_full`` walks the cause chain.

The reserve is a small preallocated file (``status/.disk_reserve``): when the disk fills, the
daemon deletes it first, so it still has room to say so in its status file and state.db, and
makes it again once space is back.
"""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
_SQLITE_FULL, _SQLITE_IOERR = 13, 10
# how libraries that drop the errno say it (safetensors: "No space left on device (os error 28)")
_MESSAGES = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122",
             "database or disk is full")
RESERVE_NAME = ".disk_reserve"
MIB = 1 << 20


def disk_error(exc: BaseException | None) -> BaseException | None:
    """The exception in *exc*'s cause/context chain that is a write failed for space, or None
    (a library's own error, e.g. torch.save's "unexpected pos", often wraps the OSError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and (code & 0xFF) in (_SQLITE_FULL, _SQLITE_IOERR):
                return exc
            if "disk I/O error" in str(exc):
                return exc
        if any(m in str(exc) for m in _MESSAGES):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def is_disk_full(exc: BaseException | None) -> bool:
    """True if *exc* (or anything in its cause/context chain) is a write that failed for space."""
    return disk_error(exc) is not None


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem of *path* (0 if unknown)."""
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return 0


def describe(path: Path) -> str:
    """'disk full (N MiB free in DIR)': the phrase status, logs and trainer-ctl show."""
    return f"disk full ({free_bytes(path) / MIB:.1f} MiB free in {path})"


class Reserve:
    """A preallocated file released when the disk fills, so the daemon can still report it."""

    def __init__(self, directory: Path, size: int = 4 * MIB) -> None:
        self.path = Path(directory) / RESERVE_NAME
        self.size = size

    def ensure(self) -> bool:
        """Make the reserve (idempotent); False if there is no room for it now."""
        try:
            if self.path.is_file() and self.path.stat().st_size >= self.size:
                return True
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        except OSError:
            self.path.unlink(missing_ok=True)
            return False

    def missing(self) -> int:
        """Bytes the reserve still has to take: its size when it is not there (it was released)."""
        try:
            return max(0, self.size - self.path.stat().st_size)
        except FileNotFoundError:
            return self.size

    def release(self) -> bool:
        """Delete the reserve; True if there was one."""
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False
