"""The daemon's published state: status/training_status.json, metrics.jsonl, layer_activity.json.

The daemon is their single writer. The status file is rewritten atomically at most every
``interval`` seconds (and at once on a state change), so readers never see a torn file.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from daemon.atomic import atomic_write_json
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


class StatusBoard:
    def __init__(self, layout: Layout, *, interval: float = 1.0) -> None:
        self.layout = layout
        self.interval = interval
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

    def append_metric(self, record: dict[str, Any]) -> None:
        if self._metrics_fh is None:
            self._metrics_fh = open(self.layout.metrics_file, "a", encoding="utf-8")
        self._metrics_fh.write(json.dumps({"time": time.time(), **record}, default=str) + "\n")

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
