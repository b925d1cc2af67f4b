"""Tolerant readers of the daemon's published files (the monitor never writes any of them).

- ``JsonFileReader``: a JSON file rewritten atomically (tmp + rename). A read sees the old or the
  new file, never a torn one; a missing or unparsable file gives the last good value (or None)
  and a plain reason.
- ``MetricsIndex``: status/metrics.jsonl, indexed incrementally. Only complete lines (ending in a
  newline) are indexed, so a torn last line is picked up on a later refresh once it is complete.
  The index keeps offsets and a few numbers per line (~40 bytes), never the parsed records, so a
  100 MB file costs a few MB; a query reads just the lines it returns.
- ``tail_lines``/``LogFollower``: the end of a log file, read backwards in blocks.
- ``open_db``/``queue_snapshot``/``recent_events``: state.db opened read-only, per call.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from daemon.logsetup import daemon_log_path, tail_lines  # noqa: F401 (re-exported)
from daemon.paths import Layout
from daemon.statedb import StateDB
from daemon.states import JobState

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
@dataclass
class MetricsQuery:
    records: list[dict[str, Any]]
    total: int            # records indexed so far
    next_seq: int         # pass as since_seq to get only newer records
    more: bool            # more records match than were returned
    generation: int       # changes when the file was replaced or truncated (start over)


class MetricsIndex:
    """Incremental index of a JSONL file that only grows (the daemon appends, one writer)."""

    CHUNK = 4 << 20

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self.generation = 0
        self._reset(None)

    def _reset(self, ino: int | None) -> None:
        self._ino = ino
        self._indexed_to = 0                 # byte offset just past the last complete line
        self._offsets = array("q")           # start of each record's line
        self._lengths = array("l")           # its length (without the newline)
        self._steps = array("q")             # step or -1
        self._jobs = array("q")              # job_id or -1
        self._times = array("d")             # time or nan
        self.skipped_lines = 0

    def __len__(self) -> int:
        return len(self._offsets)

    def refresh(self) -> int:
        """Index the lines appended since the last call; returns the number of records."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                if self._ino is not None or len(self._offsets):
                    self.generation += 1
                    self._reset(None)
                return 0
            if st.st_ino != self._ino or st.st_size < self._indexed_to:
                if self._ino is not None:
                    self.generation += 1
                    log.info("%s was replaced or truncated: indexing it again", self.path.name)
                self._reset(st.st_ino)
            if st.st_size == self._indexed_to:
                return len(self._offsets)
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(self._indexed_to)
                    pos = self._indexed_to
                    carry = b""
                    remaining = st.st_size - pos
                    while remaining > 0:
                        chunk = fh.read(min(self.CHUNK, remaining))
                        if not chunk:
                            break
                        remaining -= len(chunk)
                        buf = carry + chunk
                        start = 0
                        while True:
                            nl = buf.find(b"\n", start)
                            if nl < 0:
                                break
                            self._add(pos + start, buf[start:nl])
                            start = nl + 1
                        pos += start
                        carry = buf[start:]
                    self._indexed_to = pos      # a torn last line (no newline yet) waits
            except OSError as exc:
                log.warning("cannot read %s: %s", self.path, exc)
            return len(self._offsets)

    def _add(self, offset: int, line: bytes) -> None:
        if not line.strip():
            return
        try:
            rec = json.loads(line)
        except ValueError:
            self.skipped_lines += 1
            return
        if not isinstance(rec, dict):
            self.skipped_lines += 1
            return
        self._offsets.append(offset)
        self._lengths.append(len(line))
        self._steps.append(_as_int(rec.get("step")))
        self._jobs.append(_as_int(rec.get("job_id")))
        t = rec.get("time")
        self._times.append(float(t) if isinstance(t, (int, float)) else float("nan"))

    def read(self, seqs: list[int]) -> list[dict[str, Any]]:
        """The records at these sequence numbers (index positions), each with its ``seq``."""
        out: list[dict[str, Any]] = []
        if not seqs:
            return out
        with self._lock:
            spans = [(s, self._offsets[s], self._lengths[s]) for s in seqs]
        try:
            with open(self.path, "rb") as fh:
                i = 0
                while i < len(spans):
                    # lines next to each other in the file are read in one go
                    j = i + 1
                    while (j < len(spans) and spans[j][1] <= spans[j - 1][1] + spans[j - 1][2] + 1
                           and spans[j][1] > spans[j - 1][1] and j - i < 4096):
                        j += 1
                    start = spans[i][1]
                    fh.seek(start)
                    block = fh.read(spans[j - 1][1] + spans[j - 1][2] - start)
                    for seq, off, length in spans[i:j]:
                        try:
                            rec = json.loads(block[off - start: off - start + length])
                        except ValueError:      # the file was replaced under us: skip
                            continue
                        if isinstance(rec, dict):
                            rec["seq"] = seq
                            out.append(rec)
                    i = j
        except FileNotFoundError:
            pass
        return out

    def latest_job(self) -> int | None:
        with self._lock:
            for j in reversed(self._jobs):
                if j >= 0:
                    return j
        return None

    def query(self, *, since_step: int | None = None, job_id: int | None = None,
              since_seq: int | None = None, limit: int = 1000) -> MetricsQuery:
        """Records matching the filters. With ``since_seq``: the oldest ``limit`` after it
        (a cursor); without: the newest ``limit`` (a chart's window)."""
        self.refresh()
        with self._lock:
            n = len(self._offsets)

            def match(i: int) -> bool:
                if job_id is not None and self._jobs[i] != job_id:
                    return False
                if since_step is not None and self._steps[i] <= since_step:
                    return False
                return True

            picked: list[int] = []
            more = False
            if since_seq is not None:
                i = max(since_seq + 1, 0)
                while i < n:
                    if match(i):
                        if len(picked) == limit:
                            more = True
                            break
                        picked.append(i)
                    i += 1
                next_seq = picked[-1] if picked and more else n - 1
            else:
                i = n - 1
                while i >= 0:
                    if match(i):
                        if len(picked) == limit:
                            more = True
                            break
                        picked.append(i)
                    i -= 1
                picked.reverse()
                next_seq = n - 1
            gen = self.generation
        return MetricsQuery(records=self.read(picked), total=n, next_seq=next_seq, more=more,
                            generation=gen)

    def since(self, seq: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Records after index *seq* (for the stream), at most *limit* (the newest of them)."""
        with self._lock:
            n = len(self._offsets)
            first = max(seq + 1, n - limit, 0)
        return self.read(list(range(first, n)))


def _as_int(v: Any) -> int:
    if isinstance(v, bool):
        return -1
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return -1


# ---- logs ---------------------------------------------------------------------------------------
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
              "created_at", "updated_at", "started_at", "finished_at")


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
                d = {k: getattr(j, k) for k in JOB_FIELDS}
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
    return {k: getattr(job, k) for k in JOB_FIELDS} if job else None


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
    for st in JobState:
        try:
            n = sum(1 for p in layout.state_dir(st).iterdir()
                    if p.name.endswith(".jsonl") and not p.name.startswith("."))
        except FileNotFoundError:
            n = 0
        yield st.value, n
