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

import datetime as dt
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from daemon.atomic import atomic_write_json, fsync_dir
from daemon.diskfull import is_disk_full
from daemon.paths import Layout
from daemon.states import DaemonStatus

log = logging.getLogger("trainerd.status")

STATUS_KEYS = ("status", "current_file", "current_job_id", "current_step", "total_steps", "loss",
               "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "eta_seconds",
               "epoch", "peak_memory_bytes", "queue", "last_error", "last_event", "last_command",
               "layer_activity_summary", "updated_at", "started_at", "daemon_pid", "trainer",
               "base_model", "model_name", "paused", "paused_reason", "last_job")

JOB_KEYS = ("current_file", "current_job_id", "current_step", "total_steps", "loss", "eval_loss",
            "learning_rate", "grad_norm", "tokens_per_second", "eta_seconds", "epoch",
            "peak_memory_bytes", "layer_activity_summary")


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
    def __init__(self, layout: Layout, *, interval: float = 1.0, metrics_max_mb: float | None = None,
                 metrics_keep_files: int | None = None) -> None:
        from daemon.config import Config       # the defaults live in one place

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
        self.write_error: str | None = None     # set while the status file cannot be written
        self._metrics_fh = None

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
            if self.write_error is None:
                log.error("status file not written: %s", exc)
            self.write_error = f"{exc.strerror or exc} writing {self.layout.status_file}"
            self._last_write = now
            return
        self.write_error = None
        if self._metrics_fh is not None:
            self._metrics_fh.flush()
            os.fsync(self._metrics_fh.fileno())
        self._dirty = False
        self._last_write = now

    def set_metrics_retention(self, max_mb: float, keep_files: int) -> None:
        """metrics_max_mb / metrics_keep_files (again after a config.json reload)."""
        self.metrics_max_bytes = max(1, int(max_mb * (1 << 20)))
        self.metrics_keep_files = max(1, int(keep_files))
        self._metrics_limit = self.metrics_max_bytes     # the size at which the next rotation is due

    def append_metric(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": time.time(), **record}, default=str) + "\n"   # ASCII: len = bytes
        if self._metrics_fh is None:
            self._open_metrics()
        if self._metrics_size and self._metrics_size + len(line) > self._metrics_limit:
            self._rotate_metrics()
        assert self._metrics_fh is not None
        self._metrics_fh.write(line)
        self._metrics_size += len(line)

    def _open_metrics(self) -> None:
        self._metrics_fh = open(self.layout.metrics_file, "a", encoding="utf-8")
        self._metrics_size = os.fstat(self._metrics_fh.fileno()).st_size
        if self._metrics_size:
            # a torn last line (a crash or a full disk mid-write) is ended, so that the next
            # record starts a line of its own instead of being glued to it and lost
            with open(self.layout.metrics_file, "rb") as fh:
                fh.seek(self._metrics_size - 1)
                if fh.read(1) != b"\n":
                    self._metrics_fh.write("\n")
                    self._metrics_size += 1
        self._metrics_limit = self.metrics_max_bytes

    def _rotate_metrics(self) -> None:
        """metrics.jsonl -> .1 -> .2 ... (see the module doc); the writer then starts a new file."""
        path = self.layout.metrics_file
        fh, self._metrics_fh = self._metrics_fh, None
        assert fh is not None
        try:
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()
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
        self.flush(force=True)
        if self._metrics_fh is not None:
            self._metrics_fh.close()
            self._metrics_fh = None


def read_status(layout: Layout) -> dict[str, Any] | None:
    """Read the status file (readers tolerate a missing file; atomic writes make it whole)."""
    try:
        return json.loads(Path(layout.status_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None
