"""Validate a whole JSONL training file and detect its format, streaming (stdlib only).

One pass, bounded memory: the file is read in binary with a bounded ``readline``, each line is
decoded as UTF-8 on its own and parsed as JSON on its own, so a 10 GB file costs no more memory
than its longest allowed line (``max_line_bytes``).

Every non-blank line is one attempted record. A record is **bad** when its line is broken (too
long, not UTF-8, not JSON, not a JSON object: :data:`core.records.LINE_KINDS`), when its keys
match no format or another format than the file's (``unknown_format``, ``mixed_format``), or
when it fails :func:`core.records.check_record` (:data:`core.records.RECORD_KINDS`). Bad records
are skipped by :func:`iter_records`.

* The file is **accepted** (``ok=True``) when it has at least one valid record and at most
  ``max_bad_record_fraction`` (default 1 %) of its records are bad; the bad ones are reported
  (``bad_records``, ``error_counts``, ``bad_lines``: the first line numbers per kind, ``errors``).
* It is **rejected** (``ok=False``, it goes to ``queue/failed/``) otherwise, or when it is not a
  regular file (directory, symlink, FIFO, ...), unreadable, empty, only blank lines or UTF-16/32
  text. ``reason`` names the cause: each kind of problem with its line numbers, and the share
  of bad records against the threshold.

The file's format is the format of its first record whose format can be detected. What a record
is, its formats and their checks are in :mod:`core.records`.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from core.records import (BadRecords, check_record, describe_bad, detect_format, problem_kind, scan_lines,
                          unknown_format_detail)

logger = logging.getLogger(__name__)

_CANCEL_EVERY = 4096  # lines between two looks at ``cancel``
DEFAULT_MAX_BAD_RECORD_FRACTION = 0.01
_MAX_RUNS = 5  # format runs kept per format for the "mixed formats" reason
_MAX_MESSAGE_CHARS = 500  # a LineError message is cut to this length


@dataclass
class LineError:
    line: int
    kind: str
    message: str  # what is wrong, ending with "(line N)"


class ValidationCancelled(Exception):
    """:func:`validate_file` was told to stop (its ``cancel`` returned True) before the end."""


@dataclass
class ValidationReport:
    path: str
    ok: bool
    reason: str | None
    format: str | None
    lines: int = 0
    blank_lines: int = 0
    records: int = 0  # non-blank lines, each one attempted record
    valid_records: int = 0
    error_counts: dict[str, int] = field(default_factory=dict)  # kind -> offending lines
    errors: list[LineError] = field(default_factory=list)  # first max_errors, in line order
    format_counts: dict[str, int] = field(default_factory=dict)  # format -> records detected
    bad_records: int = 0  # records that will not be trained on (broken, wrong format, invalid)
    bad_lines: dict[str, list[int]] = field(default_factory=dict)  # kind -> first 20 line numbers
    max_bad_record_fraction: float = DEFAULT_MAX_BAD_RECORD_FRACTION  # the threshold applied
    summary: str | None = None  # the bad records in words (kinds, lines), None when there are none

    @property
    def skipped_records(self) -> int:
        """Non-blank lines that will not be trained on."""
        return self.records - self.valid_records

    @property
    def bad_fraction(self) -> float:
        return self.bad_records / self.records if self.records else 0.0

    @property
    def errors_truncated(self) -> bool:
        """True when more lines are wrong than ``errors`` lists."""
        return self.records - self.valid_records > len(self.errors)

    def first_error_lines(self) -> list[int]:
        return [e.line for e in self.errors]

    def to_json(self) -> dict:
        data = asdict(self)
        data["skipped_records"] = self.skipped_records
        data["errors_truncated"] = self.errors_truncated
        return data

    @classmethod
    def from_json(cls, data: dict) -> ValidationReport:
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["errors"] = [LineError(**e) for e in data.get("errors", [])]
        return cls(**kwargs)


def _open_regular(path: Path) -> tuple[BinaryIO | None, str | None, int]:
    """Open *path* for binary reading without following a symlink.

    Returns (file, None, size) or (None, reason, 0).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, "file not found", 0
    except OSError as exc:
        return None, f"cannot stat file: {exc.strerror or exc}", 0
    if stat.S_ISLNK(st.st_mode):
        return None, "not a regular file: it is a symlink (symlinks are never followed)", 0
    if stat.S_ISDIR(st.st_mode):
        return None, "not a regular file: it is a directory", 0
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file (FIFO, socket or device)", 0
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        return None, f"cannot open file: {exc.strerror or exc}", 0
    try:
        st2 = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        return None, f"cannot stat file: {exc.strerror or exc}", 0
    if not stat.S_ISREG(st2.st_mode):  # swapped between lstat and open
        os.close(fd)
        return None, "not a regular file (it changed while being opened)", 0
    return os.fdopen(fd, "rb"), None, st2.st_size


def _pct(x: float, other: float | None = None) -> str:
    """*x* as a percentage with 3 significant digits, more when needed to differ from *other*."""
    for digits in (3, 4, 5, 6, 8):
        text = f"{x * 100:.{digits}g} %"
        if other is None or x == other or text != f"{other * 100:.{digits}g} %":
            return text
    return f"{x * 100!r} %"


_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "UTF-32", "FF FE 00 00"),
    (b"\x00\x00\xfe\xff", "UTF-32", "00 00 FE FF"),
    (b"\xff\xfe", "UTF-16", "FF FE"),
    (b"\xfe\xff", "UTF-16", "FE FF"),
)


def _wide_text_reason(head: bytes) -> str | None:
    """Why the first bytes of a file say it is UTF-16/32 text, not UTF-8 (None if they don't)."""
    for bom, name, hexed in _BOMS:
        if head.startswith(bom):
            return f"{name} text (BOM {hexed}): convert to UTF-8 (e.g. iconv -f {name} -t UTF-8)"
    sample = head[: len(head) & ~1]
    if len(sample) >= 8:  # UTF-16 without BOM: ASCII text with a NUL byte beside every character
        even, odd = sample[0::2], sample[1::2]
        for zeros, other, order in ((odd, even, "little-endian"), (even, odd, "big-endian")):
            if zeros.count(0) >= 0.9 * len(zeros) and other.count(0) <= 0.1 * len(other):
                return (f"UTF-16 text ({order}, no BOM: a NUL byte beside every character): "
                        "convert to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    return None


class _Tally:
    """One pass over a file's lines: the report's counts, each kind of bad record, the file's
    format, and the runs of consecutive records per format (for the "mixed formats" reason)."""

    def __init__(self, report: ValidationReport, max_errors: int) -> None:
        self.report = report
        self.max_errors = max_errors
        self.bad: dict[str, BadRecords] = {}  # kind -> its records
        self.fmt: str | None = None
        # format -> [[start, end], ...] runs of consecutive records, first _MAX_RUNS only
        self.runs: dict[str, list[list[int]]] = {}
        self.n_runs: dict[str, int] = {}
        self.prev_fmt: str | None = None

    def add(self, lineno: int, event: str, payload: Any) -> None:
        """Count one scanned line (see :func:`core.records.scan_lines`)."""
        report = self.report
        if event == "blank":
            report.blank_lines += 1
            return
        report.records += 1
        if event == "error":
            self.add_error(lineno, *payload)
            return
        rec_fmt = detect_format(payload)
        if rec_fmt is None:
            self.add_error(lineno, "unknown_format", unknown_format_detail(payload))
            return
        report.format_counts[rec_fmt] = report.format_counts.get(rec_fmt, 0) + 1
        self._extend_runs(lineno, rec_fmt)
        if self.fmt is None:
            self.fmt = rec_fmt
        if rec_fmt != self.fmt:
            self.add_error(lineno, "mixed_format", f"{rec_fmt} record in a {self.fmt} file")
            return
        problems = check_record(payload, self.fmt)
        if problems:
            self._add_problems(lineno, problems)
            return
        report.valid_records += 1

    def _extend_runs(self, lineno: int, rec_fmt: str) -> None:
        if rec_fmt == self.prev_fmt:
            fmt_runs = self.runs[rec_fmt]
            if self.n_runs[rec_fmt] == len(fmt_runs):  # the open run is a stored one
                fmt_runs[-1][1] = lineno
        else:
            self.n_runs[rec_fmt] = self.n_runs.get(rec_fmt, 0) + 1
            fmt_runs = self.runs.setdefault(rec_fmt, [])
            if len(fmt_runs) < _MAX_RUNS:
                fmt_runs.append([lineno, lineno])
        self.prev_fmt = rec_fmt

    def add_error(self, line: int, kind: str, detail: str) -> None:
        """A bad record of one kind: counted, and listed in ``errors`` while there is room."""
        self.bad.setdefault(kind, BadRecords()).add(line, detail)
        errors = self.report.errors
        if len(errors) < self.max_errors:
            message = f"{detail} (line {line})"
            if len(message) > _MAX_MESSAGE_CHARS:
                message = detail[: _MAX_MESSAGE_CHARS - 13] + f"... (line {line})"
            errors.append(LineError(line=line, kind=kind, message=message))

    def _add_problems(self, lineno: int, problems: list[str]) -> None:
        """A record that fails :func:`check_record`: every kind counted, the line listed once."""
        kinds: dict[str, str] = {}  # kind -> its first detail
        for p in problems:
            kinds.setdefault(problem_kind(p), p.split(": ", 1)[-1])
        for kind, detail in kinds.items():
            self.bad.setdefault(kind, BadRecords()).add(lineno, detail)
        errors = self.report.errors
        if len(errors) < self.max_errors:
            details = [p.split(": ", 1)[-1] for p in problems[:5]]
            if len(problems) > 5:
                details.append(f"and {len(problems) - 5} more")
            message = "; ".join(details)
            if len(message) > _MAX_MESSAGE_CHARS:
                message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
            errors.append(LineError(line=lineno, kind=next(iter(kinds)), message=f"{message} (line {lineno})"))

    def error_counts(self) -> dict[str, int]:
        return {k: b.count for k, b in self.bad.items()}


def _open_checked(path: Path, report: ValidationReport) -> BinaryIO | None:
    """*path* open for reading, or None with ``report.reason`` set (not a regular file, empty)."""
    fh, why, size = _open_regular(path)
    if fh is None:
        report.reason = why
        logger.info("rejected %s: %s", path, why)
        return None
    if size == 0:
        fh.close()
        report.reason = "empty file (0 bytes)"
        logger.info("rejected %s: %s", path, report.reason)
        return None
    return fh


def _tally_lines(
    fh: BinaryIO, path: Path, tally: _Tally, max_line_bytes: int, cancel: Callable[[], bool] | None
) -> str | None:
    """Count every line of *fh* into *tally* and close it. Returns why the file is rejected
    unread (UTF-16/32 text), else None; raises OSError when it cannot be read."""
    report = tally.report
    add = tally.add
    with fh:
        wide = _wide_text_reason(fh.read(4096))
        if wide is not None:
            return wide
        fh.seek(0)
        for lineno, event, payload in scan_lines(fh, max_line_bytes):
            report.lines = lineno
            if cancel is not None and not lineno % _CANCEL_EVERY and cancel():
                raise ValidationCancelled(f"{path}: validation cancelled at line {lineno}")
            add(lineno, event, payload)
    return None


def _conclude(report: ValidationReport, tally: _Tally, max_bad_record_fraction: float) -> None:
    """Fill in the totals, the summary and the verdict (``ok``, ``reason``) of a counted file."""
    bad, fmt = tally.bad, tally.fmt
    report.format = fmt
    report.error_counts = tally.error_counts()
    report.bad_lines = {k: b.lines for k, b in bad.items()}
    report.bad_records = report.records - report.valid_records
    report.summary = describe_bad(bad, tally.runs, tally.n_runs) if bad else None
    fraction = report.bad_fraction
    if report.records == 0:
        report.reason = f"no records: the file has only blank lines ({report.blank_lines})"
    elif report.valid_records == 0:
        if fmt:
            where = f" ({fmt} format)"
        elif set(bad) == {"unknown_format"}:
            where = " (no record in a known format)"
        else:
            where = ""
        report.reason = f"no valid records{where}: {report.summary}"
    elif fraction > max_bad_record_fraction:
        verb = "is" if report.bad_records == 1 else "are"
        report.reason = (
            f"{report.bad_records} of {report.records} records {verb} bad ({_pct(fraction, max_bad_record_fraction)}"
            f" > max_bad_record_fraction {_pct(max_bad_record_fraction, fraction)}): {report.summary}"
        )
    report.ok = report.reason is None


def _log_verdict(path: Path, report: ValidationReport) -> None:
    if not report.ok:
        logger.info("rejected %s: %s", path, report.reason)
        return
    logger.debug(
        "validated %s: %s, %d/%d records valid",
        path, report.format, report.valid_records, report.records,
    )
    if report.bad_records:
        logger.info(
            "%s: %d of %d records are bad and will be skipped: %s",
            path, report.bad_records, report.records, report.summary,
        )


def validate_file(
    path: Path,
    *,
    max_bad_record_fraction: float = DEFAULT_MAX_BAD_RECORD_FRACTION,
    max_errors: int = 20,
    max_line_bytes: int = 64 * 1024 * 1024,
    cancel: Callable[[], bool] | None = None,
) -> ValidationReport:
    """Check a whole JSONL file in one streaming pass; never raises for bad content.

    The file is accepted when at least one record is valid and at most
    ``max_bad_record_fraction`` of its records are bad (see the module doc). ``cancel``, when
    given, is called every few thousand lines; when it returns True the pass stops with
    :class:`ValidationCancelled`.
    """
    if not 0 <= max_bad_record_fraction < 1:
        raise ValueError(f"max_bad_record_fraction must be in [0, 1), not {max_bad_record_fraction!r}")
    path = Path(path)
    report = ValidationReport(path=str(path), ok=False, reason=None, format=None,
                              max_bad_record_fraction=max_bad_record_fraction)
    fh = _open_checked(path, report)
    if fh is None:
        return report
    tally = _Tally(report, max_errors)
    try:
        wide = _tally_lines(fh, path, tally, max_line_bytes, cancel)
    except OSError as exc:
        report.reason = f"cannot read file: {exc.strerror or exc}"
        report.error_counts = tally.error_counts()
        logger.warning("rejected %s: %s", path, report.reason)
        return report
    if wide is not None:
        report.reason = wide
        logger.info("rejected %s: %s", path, wide)
        return report
    _conclude(report, tally, max_bad_record_fraction)
    _log_verdict(path, report)
    return report


def iter_records(
    path: Path, *, max_line_bytes: int = 64 * 1024 * 1024
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for every valid record of the file's format, in order.

    The file's format is that of its first detectable record (as in :func:`validate_file`).
    Blank lines and every bad record that :func:`validate_file` counts are skipped: broken lines
    (too long, not UTF-8, not JSON, not an object), records of no or another format, and records
    that fail :func:`core.records.check_record`. Raises
    ``ValueError`` for a path that is not a regular file (symlinks are never followed) and
    ``OSError`` when it cannot be read. Meant for files that :func:`validate_file` accepted.
    """
    fh, why, _size = _open_regular(Path(path))
    if fh is None:
        raise ValueError(f"{path}: {why}")
    fmt: str | None = None
    with fh:
        for lineno, event, payload in scan_lines(fh, max_line_bytes):
            if event != "record":
                continue
            rec_fmt = detect_format(payload)
            if rec_fmt is None:
                continue
            if fmt is None:
                fmt = rec_fmt
            if rec_fmt != fmt or check_record(payload, fmt):
                continue
            yield lineno, payload
