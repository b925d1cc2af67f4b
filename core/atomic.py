"""The one way state files are written: tmp + fsync + rename + fsync of the directory.

A rename is atomic but not durable until the directory itself is fsynced (fsync(2)).
A failed fsync is never retried: the kernel may already have dropped the dirty pages
("fsyncgate"), so the error propagates and the write counts as failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less this process's umask
    (read from /proc, which, unlike os.umask, changes nothing another thread could see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def give_default_modes(directory: Path) -> None:
    """Give the regular files in *directory* the mode their siblings have: writers that go
    through a private temp file (safetensors) leave 0600 weights next to 0644 configs."""
    mode = default_file_mode()
    for f in directory.iterdir():
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


def fsync_dir(directory: Path) -> None:
    """Make the directory entries (renames, creations) of *directory* durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under *root*, then every directory, deepest first (before a rename)."""
    root = Path(root)
    paths = sorted(root.rglob("*"))
    for p in paths:
        if p.is_file() and not p.is_symlink():
            fsync_file(p)
    for d in sorted({p.parent for p in paths} | {root}, key=lambda x: len(x.parts), reverse=True):
        fsync_dir(d)


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace *path* with *data* so that readers see the old or the new file, never a torn one."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def durable_rename(src: Path, dst: Path) -> None:
    """One os.rename (same filesystem), then fsync both directories so the move survives a crash."""
    os.rename(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (dataset identity, checkpoint manifests, bases)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON state file; a missing file gives *default*. Atomic writers make torn reads impossible."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
