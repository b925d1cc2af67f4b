"""Daemon logging: logs/daemon_YYYYMMDD.log, a new file each day (daily rotation by name)."""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
from pathlib import Path

from daemon.paths import Layout

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class DailyFileHandler(logging.Handler):
    """Writes to ``<dir>/<prefix>_YYYYMMDD.log``, switching files when the date changes."""

    def __init__(self, directory: Path, prefix: str = "daemon") -> None:
        super().__init__()
        self.directory, self.prefix = Path(directory), prefix
        self._day: str | None = None
        self._fh = None

    def _today(self) -> str:
        return dt.date.today().strftime("%Y%m%d")

    def _stream(self):
        day = self._today()
        if day != self._day:
            if self._fh:
                self._fh.close()
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.directory / f"{self.prefix}_{day}.log", "a", encoding="utf-8")
            self._day = day
        return self._fh

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fh = self._stream()
            fh.write(self.format(record) + "\n")
            fh.flush()
        except Exception:  # logging must never take the daemon down
            self.handleError(record)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
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
