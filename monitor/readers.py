"""Tolerant readers of the daemon's published files (the monitor never writes any of them).

- ``JsonFileReader``: a JSON file rewritten atomically (tmp + rename). A read sees the old or the
  new file, never a torn one; a missing or unparsable file gives the last good value (or None)
  and a plain reason.
- ``MetricsIndex`` (monitor/metrics_index.py): the metrics history, indexed incrementally.
- ``tail_lines``/``LogFollower``: the end of a log file, read backwards in blocks.
- ``open_db``/``queue_snapshot``/``recent_events``: state.db opened read-only, per call.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from core.logsetup import daemon_log_path, tail_lines  # noqa: F401 (re-exported)
from core.paths import Layout
from core.statedb import Job, StateDB
from core.states import FOLDER_STATES, JobState

log = logging.getLogger("monitor.readers")

StatKey = tuple[int, int, int] | None


def stat_key(path: Path) -> StatKey:
    """(inode, mtime_ns, size) of *path*, or None when it does not exist: cheap change detection."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class JsonFileReader:
    """Reads a JSON file again only when its (inode, mtime, size) changed; keeps the last good value."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._key: StatKey = None
        self._value: Any = None
        self._reason: str | None = "not read yet"

    def read(self) -> tuple[Any, str | None]:
        """(value, reason): reason is None when value is the file's current content."""
        with self._lock:
            key = stat_key(self.path)
            if key is None:
                self._key = None
                self._reason = f"{self.path.name} does not exist yet"
                return self._value, self._reason
            if key == self._key:
                return self._value, self._reason
            try:
                value = json.loads(self.path.read_bytes())
            except FileNotFoundError:      # replaced or removed between stat and open
                return self._value, f"{self.path.name} was being replaced"
            except (ValueError, OSError) as exc:   # a non-atomic writer: keep the last good value
                log.debug("unreadable %s: %s", self.path, exc)
                return self._value, f"{self.path.name} is unreadable right now ({exc.__class__.__name__})"
            self._key, self._value, self._reason = key, value, None
            return value, None


# ---- metrics.jsonl ------------------------------------------------------------------------------
def log_paths(layout: Layout) -> dict[str, Path | None]:
    return {"daemon": daemon_log_path(layout), "training": layout.training_log}


@dataclass
class LogFollower:
    """Follows one log file for a stream: new complete lines since the last poll."""
    offset: int = -1
    ino: int | None = None
    path: Path | None = None
    partial: bytes = field(default=b"", repr=False)
    started: bool = False

    def poll(self, path: Path | None, initial_lines: int = 200,
             max_bytes: int = 256 * 1024) -> tuple[list[str], bool] | None:
        """(lines, reset) when there is something new, else None. The first call always answers."""
        first, self.started = not self.started, True
        if path is None or not path.exists():
            if first:
                return [], True
        if path is None:
            if self.path is not None:
                self.path, self.ino, self.offset = None, None, -1
                return [], True
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if self.path is not None:
                self.path, self.ino, self.offset = None, None, -1
                return [], True
            return None
        if path != self.path or st.st_ino != self.ino or st.st_size < self.offset or self.offset < 0:
            self.path, self.ino, self.offset, self.partial = path, st.st_ino, st.st_size, b""
            return tail_lines(path, initial_lines), True
        if st.st_size == self.offset:
            return None
        try:
            with open(path, "rb") as fh:
                start = max(self.offset, st.st_size - max_bytes)
                fh.seek(start)
                data = fh.read(st.st_size - start)
        except OSError:
            return None
        skipped = start > self.offset
        self.offset = st.st_size
        data = (b"" if skipped else self.partial) + data
        cut = data.rfind(b"\n")
        self.partial, data = data[cut + 1:], data[: cut + 1]
        if not data:
            return None
        lines = data.decode("utf-8", errors="replace").splitlines()
        if skipped and lines:
            lines = lines[1:]
        return lines, False


# ---- state.db -----------------------------------------------------------------------------------
class NoDatabase(RuntimeError):
    """state.db does not exist yet (the daemon creates it when it first starts)."""


def open_db(layout: Layout) -> StateDB:
    if not layout.state_db.exists():
        raise NoDatabase("no queue yet: status/state.db is created when the daemon first starts")
    try:
        return StateDB(layout.state_db, readonly=True)
    except sqlite3.Error as exc:
        raise NoDatabase(f"status/state.db cannot be opened: {exc}") from exc


def db_version(layout: Layout) -> tuple[StatKey, StatKey]:
    """Changes whenever state.db (or its WAL) is written."""
    return stat_key(layout.state_db), stat_key(layout.state_db.with_name(layout.state_db.name + "-wal"))


JOB_FIELDS = ("id", "name", "original_name", "state", "priority", "size", "records", "attempts",
              "error", "format", "steps", "resume", "forced", "duplicate_of", "sha256",
              "created_at", "updated_at", "started_at", "finished_at", "data_report")


def job_json(job: Job) -> dict[str, Any]:
    """A job as the API shows it; ``data_report`` parsed (null before the job's first start)."""
    d = job.to_json()
    return {k: d.get(k) for k in JOB_FIELDS}


def queue_snapshot(layout: Layout, limit_per_state: int = 1000) -> dict[str, Any]:
    """Every job, grouped by state: processing, pending (in training order), failed and done (newest
    first). ``counts`` are the full counts even where a list is cut at *limit_per_state*."""
    empty = {s.value: [] for s in JobState}
    try:
        db = open_db(layout)
    except NoDatabase as exc:
        return {"available": False, "reason": str(exc), "jobs": empty,
                "counts": {s.value: 0 for s in JobState}}
    try:
        counts = db.counts()
        jobs: dict[str, list[dict[str, Any]]] = {}
        for st in JobState:
            rows = db.jobs(st, limit=limit_per_state, newest_first=st in (JobState.DONE, JobState.FAILED))
            out = []
            for pos, j in enumerate(rows):
                d = job_json(j)
                if st is JobState.PENDING:
                    d["position"] = pos + 1
                out.append(d)
            jobs[st.value] = out
    except sqlite3.Error as exc:
        return {"available": False, "reason": f"status/state.db could not be read: {exc}",
                "jobs": empty, "counts": {s.value: 0 for s in JobState}}
    finally:
        db.close()
    return {"available": True, "jobs": jobs, "counts": counts,
            "truncated": {k: max(0, counts.get(k, 0) - len(v)) for k, v in jobs.items()}}


def job_counts(layout: Layout) -> dict[str, int] | None:
    try:
        db = open_db(layout)
    except NoDatabase:
        return None
    try:
        return db.counts()
    except sqlite3.Error:
        return None
    finally:
        db.close()


def find_job(layout: Layout, name: str) -> dict[str, Any] | None:
    """The job with exactly this queue name, or None. Names are looked up, never used as paths."""
    if not name or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
        return None
    try:
        db = open_db(layout)
    except NoDatabase:
        return None
    try:
        job = db.by_name(name)
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return job_json(job) if job else None


def recent_events(layout: Layout, limit: int = 100, since_id: int = 0) -> dict[str, Any]:
    try:
        db = open_db(layout)
    except NoDatabase as exc:
        return {"available": False, "reason": str(exc), "events": []}
    try:
        return {"available": True, "events": db.events(limit=limit, since_id=since_id)}
    except sqlite3.Error as exc:
        return {"available": False, "reason": f"status/state.db could not be read: {exc}", "events": []}
    finally:
        db.close()


def iter_queue_files(layout: Layout) -> Iterator[tuple[str, int]]:
    """(state, number of data files in queue/<state>/), for Prometheus."""
    for st in FOLDER_STATES:
        try:
            n = sum(1 for p in layout.state_dir(st).iterdir()
                    if p.name.endswith(".jsonl") and not p.name.startswith("."))
        except FileNotFoundError:
            n = 0
        yield st.value, n
