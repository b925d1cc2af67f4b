"""Daemon logging: logs/daemon_YYYYMMDD.log, a new file each day (daily rotation by name)."""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
from pathlib import Path

from core.paths import Layout

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class DailyFileHandler(logging.Handler):
    """Writes to ``<dir>/<prefix>_YYYYMMDD.log``, switching files when the date changes.

    Each record is one ``os.write`` of whole lines (O_APPEND): nothing is buffered, so a failed
    write loses only its own record. While the disk is full records are dropped quietly (no
    "--- Logging error ---" traceback per line) and counted; the next line written says how many.
    """

    def __init__(self, directory: Path, prefix: str = "daemon") -> None:
        super().__init__()
        self.directory, self.prefix = Path(directory), prefix
        self._day: str | None = None
        self._fd: int | None = None
        self.dropped = 0
        self._torn = False      # a line was cut short by a full disk: the next one starts afresh

    def _today(self) -> str:
        return dt.date.today().strftime("%Y%m%d")

    def _file(self) -> int:
        day = self._today()
        if day != self._day or self._fd is None:
            self._close_fd()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.directory / f"{self.prefix}_{day}.log",
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._day = day
        return self._fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            if self.dropped:
                text = (f"{self.formatter.formatTime(record) if self.formatter else ''} WARNING "
                        f"trainerd.log: {self.dropped} log line(s) dropped: the disk was full\n") + text
            data = text.encode("utf-8", "backslashreplace")
            if self._torn:
                data = b"\n" + data
            fd = self._file()
            while data:
                n = os.write(fd, data)
                self._torn = True           # until the whole line is out
                data = data[n:]
            self._torn = False
            self.dropped = 0
        except OSError as exc:
            from core.diskfull import is_disk_full
            if is_disk_full(exc):
                self.dropped += 1           # said in the first line written once space is back
            else:
                self.handleError(record)
        except Exception:  # logging must never take the daemon down
            self.handleError(record)

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def close(self) -> None:
        self._close_fd()
        super().close()


def setup_logging(log_dir: Path, *, console: bool = True, level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(FORMAT)
    fh = DailyFileHandler(log_dir)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if console:
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    for noisy in ("watchdog", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)



def tail_lines(path: Path, n: int, max_bytes: int = 512 * 1024) -> list[str]:
    """The last *n* lines of a text file (reads at most *max_bytes* from its end)."""
    if n <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            pos = end
            data = b""
            while pos > 0 and data.count(b"\n") <= n and end - pos < max_bytes:
                step = min(64 * 1024, pos, max_bytes - (end - pos))
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if pos > 0 and lines:       # the first line is probably cut
        lines = lines[1:]
    return lines[-n:]


_DAILY_LOG = re.compile(r"^daemon_\d{8}\.log$")


def daemon_log_path(layout: Layout) -> Path | None:
    """Today's (or the newest) logs/daemon_YYYYMMDD.log."""
    try:
        logs = sorted(p for p in layout.logs.glob("daemon_*.log")
                      if _DAILY_LOG.match(p.name) and p.is_file())
    except OSError:
        return None
    return logs[-1] if logs else None
