"""The daemon's published state: status/training_status.json, metrics.jsonl, layer_activity.json.

The daemon is their single writer. The status file is rewritten atomically at most every
``interval`` seconds (and at once on a state change), so readers never see a torn file.

metrics.jsonl is appended to, one complete line per record. Before a record would take it past
``metrics_max_mb`` it is rotated: ``metrics.jsonl.N`` -> ``.N+1`` (the oldest beyond
``metrics_keep_files`` goes), ``metrics.jsonl`` -> ``metrics.jsonl.1``, each one rename, and a new
file is started. Readers (monitor/readers.py ``MetricsIndex``) read the rotated files, oldest
first, then the current one: ``metrics_files``.
"""
from __future__ import annotations

import collections
import datetime as dt
import errno
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_json, fsync_dir
from core.diskfull import is_disk_full
from core.paths import Layout
from core.states import DaemonStatus

log = logging.getLogger("trainerd.status")

STATUS_KEYS = ("status", "current_file", "current_job_id", "current_step", "total_steps", "loss",
               "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "eta_seconds",
               "epoch", "peak_memory_bytes", "queue", "last_error", "last_event", "last_command",
               "layer_activity_summary", "updated_at", "started_at", "daemon_pid", "trainer",
               "base_model", "model_name", "paused", "paused_reason", "last_job", "preparing")

JOB_KEYS = ("current_file", "current_job_id", "current_step", "total_steps", "loss", "eval_loss",
            "learning_rate", "grad_norm", "tokens_per_second", "eta_seconds", "epoch",
            "peak_memory_bytes", "layer_activity_summary", "preparing")


def iso(ts: float | None = None) -> str:
    return dt.datetime.fromtimestamp(ts if ts is not None else time.time(),
                                     dt.timezone.utc).isoformat(timespec="seconds")


def rotated_metrics(path: Path) -> list[tuple[int, Path]]:
    """The rotated files of *path* (``NAME.N``) that exist, as (N, path), oldest (highest N) first."""
    pat = re.compile(re.escape(path.name) + r"\.([0-9]{1,6})")
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), path.parent / n) for n in names if (m := pat.fullmatch(n))]
    return sorted(found, reverse=True)


def metrics_files(path: Path) -> list[Path]:
    """All of the metrics history: the rotated files oldest first, then *path* (those that exist)."""
    return [p for _, p in rotated_metrics(path)] + ([path] if path.exists() else [])


class StatusBoard:
    """The status file and metrics.jsonl, written by the daemon alone.

    A full disk never loses a record: metrics lines are written whole with ``os.write`` on an
    O_APPEND descriptor (a short write is cut back, so no torn line stays) and a line that could
    not be written waits in memory (at most ``MAX_PENDING_METRICS``) until a later append or
    flush succeeds. ``write_error`` says why something waits; the daemon pauses for it.
    """

    MAX_PENDING_METRICS = 200_000

    def __init__(self, layout: Layout, *, interval: float = 1.0, metrics_max_mb: float | None = None,
                 metrics_keep_files: int | None = None) -> None:
        from core.config import Config  # the defaults live in one place

        self.layout = layout
        self.interval = interval
        fields = Config.model_fields
        self._metrics_size = 0
        self.set_metrics_retention(fields["metrics_max_mb"].default if metrics_max_mb is None else metrics_max_mb,
                                   fields["metrics_keep_files"].default if metrics_keep_files is None
                                   else metrics_keep_files)
        self.state: dict[str, Any] = {k: None for k in STATUS_KEYS}
        self.state.update(status=DaemonStatus.IDLE.value, daemon_pid=os.getpid(),
                          started_at=iso(), paused=False, queue={})
        self._dirty = True
        self._last_write = 0.0
        self._status_error: str | None = None    # set while the status file cannot be written
        self._metrics_error: str | None = None   # set while metrics lines wait in memory
        self._metrics_fd: int | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._dropped = 0

    @property
    def write_error(self) -> str | None:
        """Why the status file or metrics lines are not on disk (a full disk), else None."""
        return self._status_error or self._metrics_error

    def update(self, **fields: Any) -> None:
        for k, v in fields.items():
            if isinstance(v, DaemonStatus):
                v = v.value
            if self.state.get(k) != v:
                self.state[k] = v
                self._dirty = True

    def set_status(self, status: DaemonStatus) -> None:
        changed = self.state["status"] != status.value
        self.update(status=status)
        if changed:
            self.flush(force=True)

    def clear_job(self) -> None:
        self.update(**{k: None for k in JOB_KEYS})

    def flush(self, force: bool = False) -> None:
        if self._pending:
            self._write_metrics()
        now = time.time()
        if not self._dirty or (not force and now - self._last_write < self.interval):
            return
        self.state["updated_at"] = iso(now)
        try:
            atomic_write_json(self.layout.status_file, self.state)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # a full disk: keep the state in memory (still dirty) and say so once; the daemon
            # notices ``write_error`` and pauses until space is back
            if self._status_error is None:
                log.error("status file not written: %s", exc)
            self._status_error = f"{exc.strerror or exc} writing {self.layout.status_file}"
            self._last_write = now
            return
        self._status_error = None
        if self._metrics_fd is not None and not self._pending:
            try:
                os.fsync(self._metrics_fd)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                self._metrics_error = f"{exc.strerror or exc} writing {self.layout.metrics_file}"
        self._dirty = False
        self._last_write = now

    def set_metrics_retention(self, max_mb: float, keep_files: int) -> None:
        """metrics_max_mb / metrics_keep_files (again after a config.json reload)."""
        self.metrics_max_bytes = max(1, int(max_mb * (1 << 20)))
        self.metrics_keep_files = max(1, int(keep_files))
        self._metrics_limit = self.metrics_max_bytes     # the size at which the next rotation is due

    def append_metric(self, record: dict[str, Any]) -> None:
        """Append one record (never raises for a full disk: the line waits, see the class doc)."""
        line = (json.dumps({"time": time.time(), **record}, default=str) + "\n").encode("utf-8")
        self._pending.append(line)
        if len(self._pending) > self.MAX_PENDING_METRICS:
            self._pending.popleft()
            self._dropped += 1
            if self._dropped == 1:
                log.error("more than %d metrics records wait for disk space: dropping the oldest",
                          self.MAX_PENDING_METRICS)
        self._write_metrics()

    def _write_metrics(self) -> bool:
        """Write the waiting lines in order; False (and ``write_error`` set) on a full disk."""
        try:
            if self._metrics_fd is None:
                self._open_metrics()
            while self._pending:
                line = self._pending[0]
                if self._metrics_size and self._metrics_size + len(line) > self._metrics_limit:
                    self._rotate_metrics()
                self._append(line)
                self._pending.popleft()
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            if self._metrics_error is None:
                log.error("metrics not written (%d record(s) wait in memory): %s", len(self._pending), exc)
            self._metrics_error = f"{exc.strerror or exc} writing {self.layout.metrics_file}"
            return False
        if self._metrics_error is not None:
            log.info("metrics written again (%s)", self.layout.metrics_file.name)
        self._metrics_error = None
        return True

    def _append(self, data: bytes) -> None:
        """One whole line or nothing: a short write is cut back to where the line began."""
        assert self._metrics_fd is not None
        n = os.write(self._metrics_fd, data)      # an error: nothing was written
        if n < len(data):
            try:
                os.ftruncate(self._metrics_fd, self._metrics_size)
            except OSError as exc:
                log.warning("could not cut a partial metrics line: %s", exc)
            raise OSError(errno.ENOSPC, "No space left on device (short write)", str(self.layout.metrics_file))
        self._metrics_size += n

    def _open_metrics(self) -> None:
        path = self.layout.metrics_file
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._metrics_fd = fd
        self._metrics_size = os.fstat(fd).st_size
        self._metrics_limit = self.metrics_max_bytes
        if self._metrics_size:
            # a torn last line (a crash mid-write) is ended, so that the next record starts a
            # line of its own instead of being glued to it and lost
            with open(path, "rb") as fh:
                fh.seek(self._metrics_size - 1)
                torn = fh.read(1) != b"\n"
            if torn:
                try:
                    self._append(b"\n")
                except OSError:
                    self._metrics_fd = None      # opened again (and the line ended) next time
                    os.close(fd)
                    raise

    def _close_metrics(self) -> None:
        fd, self._metrics_fd = self._metrics_fd, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rotate_metrics(self) -> None:
        """metrics.jsonl -> .1 -> .2 ... (see the module doc); the writer then starts a new file."""
        path = self.layout.metrics_file
        self._close_metrics()
        keep = self.metrics_keep_files
        try:
            for n, old in rotated_metrics(path):      # oldest first
                if n >= keep:                          # the oldest kept one is replaced below
                    if n > keep:
                        old.unlink(missing_ok=True)
                    continue
                os.replace(old, path.with_name(f"{path.name}.{n + 1}"))
            os.replace(path, path.with_name(f"{path.name}.1"))
            fsync_dir(path.parent)
        except OSError as exc:       # keep appending to the file we have; try again later
            log.warning("could not rotate %s: %s", path, exc)
            self._open_metrics()
            self._metrics_limit = self._metrics_size + self.metrics_max_bytes
            return
        log.info("rotated %s (%d MiB); keeping %d older file(s)", path.name,
                 self._metrics_size >> 20, keep)
        self._open_metrics()

    def write_layer_activity(self, table: Any) -> None:
        atomic_write_json(self.layout.layer_activity_file, table)

    def close(self) -> None:
        try:
            self.flush(force=True)
        finally:
            self._close_metrics()


def read_status(layout: Layout) -> dict[str, Any] | None:
    """Read the status file (readers tolerate a missing file; atomic writes make it whole)."""
    try:
        return json.loads(Path(layout.status_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None
