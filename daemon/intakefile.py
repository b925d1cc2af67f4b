"""A file at the queue's door: which inbox names are taken, the name it gets, and its check.

``check_file`` stats, hashes and validates a file by reads alone (no state.db, no move), so it
runs off the daemon's loop (daemon/intakecheck.py); ``FsQueue.accept`` then only makes sure the
file is still the one checked.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.atomic import sha256_file
from core.states import Priority
from core.validation import ValidationCancelled, ValidationReport, validate_file

IGNORED_SUFFIXES = (".tmp", ".part")
_UNSAFE = re.compile(r"[^\w.+@=-]+")     # \w: letters and digits of any script, and _


class FileChanged(RuntimeError):
    """The file changed while it was being taken in: it is still being written; try later."""


def printable(name: str) -> str:
    """A file name as text that SQLite and JSON accept (undecodable bytes become U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def is_candidate(name: str) -> bool:
    """A name the inbox takes: *.jsonl, not hidden, not a temp/partial file."""
    return not is_ignored(name) and name.endswith(".jsonl")


def safe_name(name: str) -> str:
    """A file name safe to keep in the queue: no path parts, no odd characters, ends .jsonl.
    Letters of any script stay (NFC: one form per letter); ``données_✓.jsonl`` -> ``données.jsonl``."""
    base = unicodedata.normalize("NFC", Path(name).name)
    stem = base[: -len(".jsonl")] if base.endswith(".jsonl") else base
    # a leading "-" would read as an option in every command line that names the file
    stem = _UNSAFE.sub("_", stem).strip("._").lstrip("-").strip("._") or "dataset"
    stem = stem[:120]
    while len(stem.encode("utf-8")) > 180:     # a file name holds 255 bytes, not characters
        stem = stem[:-1]
    return stem + ".jsonl"


@dataclass
class Intake:
    """Options for a file entering the queue."""
    priority: Priority = Priority.NORMAL
    force: bool = False
    original_name: str | None = None


@dataclass(frozen=True)
class Checked:
    """The slow part of taking a file in: what it is, its sha256 and its validation.

    Made by :func:`check_file` from reads alone (no state.db, no move), so it can run on another
    thread; :meth:`FsQueue.accept` then only makes sure the file is still the one checked.
    """
    ident: tuple[int, int, int, int, int]    # (type bits, device, inode, size, mtime_ns) when checked
    sha256: str | None = None
    report: ValidationReport | None = None
    reason: str | None = None                # why it is rejected (before the duplicate check)

    @property
    def size(self) -> int | None:
        return self.ident[3] if stat.S_ISREG(self.ident[0]) else None


def ident(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _sha256(path: Path, cancel: Callable[[], bool] | None, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes; ``cancel()`` is asked every 64 MiB (ValidationCancelled)."""
    if cancel is None:
        return sha256_file(path, chunk)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for n, block in enumerate(iter(lambda: fh.read(chunk), b"")):
            if n % 64 == 63 and cancel():
                raise ValidationCancelled(f"{path}: hashing cancelled")
            h.update(block)
    return h.hexdigest()


def check_file(src: Path, *, max_bad_record_fraction: float, name: str | None = None,
               cancel: Callable[[], bool] | None = None) -> Checked:
    """Stat, hash and validate *src* (pure reads). Raises FileChanged when the file changed
    meanwhile (still being written), FileNotFoundError when it is gone, and ValidationCancelled
    when ``cancel()`` said stop."""
    st = os.lstat(src)
    label = name or src.name
    if stat.S_ISLNK(st.st_mode):
        return Checked(ident(st), reason="a symbolic link, not a regular file (links are never followed)")
    if stat.S_ISDIR(st.st_mode):
        return Checked(ident(st), reason="a directory, not a regular file")
    if not stat.S_ISREG(st.st_mode):
        return Checked(ident(st), reason="not a regular file")
    try:
        sha = _sha256(src, cancel)
    except ValidationCancelled:
        raise
    except OSError as exc:
        if not os.path.lexists(src):
            raise FileNotFoundError(exc.errno, f"{label} vanished while it was being read") from None
        return Checked(ident(st), reason=f"unreadable: {exc.strerror or exc}")
    report = validate_file(src, max_bad_record_fraction=max_bad_record_fraction, cancel=cancel)
    try:
        after = os.lstat(src)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"{label} vanished while it was being read") from None
    if ident(after) != ident(st):
        raise FileChanged(f"{label} changed while it was being read; taken later")
    return Checked(ident(st), sha256=sha, report=report,
                   reason=None if report.ok else (report.reason or "invalid data"))
