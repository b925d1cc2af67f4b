"""Tolerant readers of the daemon's published files (the monitor never writes any of them).

- ``JsonFileReader``: a JSON file rewritten atomically (tmp + rename). A read sees the old or the
  new file, never a torn one; a missing or unparsable file gives the last good value (or None)
  and a plain reason.
- ``MetricsIndex``: status/metrics.jsonl and its rotated files (metrics.jsonl.N, older first),
  indexed incrementally; a rotation while it indexes is followed by inode. Only complete lines
  (ending in a newline) are indexed, so a torn last line is picked up once it is complete.
  The index keeps offsets and a few numbers per line (~40 bytes), never the parsed records, so a
  100 MB file costs a few MB; a query reads just the lines it returns.
- ``tail_lines``/``LogFollower``: the end of a log file, read backwards in blocks.
- ``open_db``/``queue_snapshot``/``recent_events``: state.db opened read-only, per call.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import sqlite3
import threading
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from core.logsetup import daemon_log_path, tail_lines  # noqa: F401 (re-exported)
from core.paths import Layout
from core.statedb import Job, StateDB
from daemon.status import rotated_metrics
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
@dataclass
class MetricsQuery:
    records: list[dict[str, Any]]
    total: int            # the seq after the newest record (records indexed, rotated out ones too)
    next_seq: int         # pass as since_seq to get only newer records
    more: bool            # more records match than were returned
    generation: int       # changes when the file was replaced or truncated (start over)


@dataclass
class _Segment:
    """One file of the history, held open (by inode: a rename during rotation changes nothing)."""
    fd: int
    ino: int
    first: int               # index (in the arrays) of its first record
    indexed_to: int = 0      # byte offset just past its last complete line
    seen: int = 0            # its size when last indexed


class MetricsIndex:
    """Incremental index of status/metrics.jsonl and its rotated files (one writer appends).

    The daemon rotates metrics.jsonl (daemon/status.py): the history is ``metrics.jsonl.N`` ...
    ``.1`` (oldest first), then ``metrics.jsonl``. Each file is a segment, kept open, so a
    rotation (renames) just adds a new segment for the new file; when the oldest file is deleted
    its segment is dropped and its records' seqs are never reused (seq = dropped + position), so
    a cursor stays valid. Anything else (a file truncated, the current file replaced or removed,
    an older file appearing) indexes everything again under a new ``generation``.
    """

    CHUNK = 4 << 20

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self.generation = 0
        self._segs: list[_Segment] = []
        self._clear()
        self._top: tuple[Any, int, dict[int, int]] = (None, 0, {})   # max_steps(): (key, upto, steps)

    def _clear(self) -> None:
        for seg in self._segs:
            os.close(seg.fd)
        self._segs = []
        self._base = 0                       # seq of the record at position 0
        self._offsets = array("q")           # start of each record's line in its file
        self._lengths = array("l")           # its length (without the newline)
        self._steps = array("q")             # step or -1
        self._jobs = array("q")              # job_id or -1
        self._times = array("d")             # time or nan
        self.skipped_lines = 0

    def _restart(self) -> None:
        if self._segs or len(self._offsets):
            self.generation += 1
            log.info("%s was replaced or truncated: indexing it again", self.path.name)
        self._clear()

    def close(self) -> None:
        with self._lock:
            self._clear()

    def __del__(self) -> None:
        for seg in getattr(self, "_segs", ()):
            try:
                os.close(seg.fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self._offsets)

    # ---- which files ---------------------------------------------------------------------------
    def _view(self) -> list[tuple[int, Path]]:
        out = []
        for p in [p for _, p in rotated_metrics(self.path)] + [self.path]:
            try:
                out.append((os.stat(p).st_ino, p))
            except (FileNotFoundError, NotADirectoryError):
                pass
        return out

    def _stable_view(self) -> list[tuple[int, Path]]:
        """The history files, oldest first, as two listings in a row agree (not mid-rotation)."""
        view = self._view()
        for _ in range(10):
            again = self._view()
            if again == view:
                break
            view = again
        return view

    def _sync(self, view: list[tuple[int, Path]]) -> str:
        """Match the segments to the files: "ok", "reset" (start over) or "retry" (a race)."""
        inos = [ino for ino, _ in view]
        k = 0
        while k < len(self._segs) and self._segs[k].ino not in inos:
            k += 1                           # rotated away at the old end
        if self._segs and k == len(self._segs):
            return "reset"                   # the newest file is gone or replaced
        rest = self._segs[k:]
        if [s.ino for s in rest] != inos[: len(rest)]:
            return "reset"
        if k:
            self._drop(k)
        for ino, path in view[len(rest):]:   # files newer than all segments: a rotation
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return "retry"
            if os.fstat(fd).st_ino != ino:
                os.close(fd)
                return "retry"
            self._segs.append(_Segment(fd, ino, len(self._offsets)))
        return "ok"

    def _drop(self, k: int) -> None:
        count = self._segs[k].first
        for seg in self._segs[:k]:
            os.close(seg.fd)
        self._segs = self._segs[k:]
        for arr in (self._offsets, self._lengths, self._steps, self._jobs, self._times):
            del arr[:count]
        self._base += count
        for seg in self._segs:
            seg.first -= count

    # ---- indexing ------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Index what was appended (or rotated in) since the last call; returns the seq after the
        newest record: the number of records indexed, counting those rotated out since."""
        with self._lock:
            for _ in range(3):
                state = self._sync(self._stable_view())
                if state == "reset":
                    self._restart()
                    state = self._sync(self._stable_view())
                if state == "retry":
                    continue
                try:
                    if self._index_all():
                        break
                except OSError as exc:
                    log.warning("cannot read %s: %s", self.path, exc)
                    break
                self._restart()
            return self._base + len(self._offsets)

    def _index_all(self) -> bool:
        """Index every segment to its end; False when one shrank or an older one grew."""
        for i, seg in enumerate(self._segs):
            size = os.fstat(seg.fd).st_size
            if size < seg.indexed_to:
                return False
            if size > seg.seen:
                if i + 1 < len(self._segs) and len(self._offsets) > self._segs[i + 1].first:
                    return False             # records must stay in file order
                self._index(seg, size)
                for later in self._segs[i + 1:]:
                    later.first = len(self._offsets)   # none of theirs indexed yet (checked above)
        return True

    def _index(self, seg: _Segment, size: int) -> None:
        pos = seg.indexed_to
        carry = b""
        remaining = size - pos
        while remaining > 0:
            chunk = os.pread(seg.fd, min(self.CHUNK, remaining), pos + len(carry))
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
        seg.indexed_to = pos                 # a torn last line (no newline yet) waits
        seg.seen = size

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

    # ---- reading -------------------------------------------------------------------------------
    def read(self, seqs: list[int]) -> list[dict[str, Any]]:
        """The records with these seqs (still indexed), each with its ``seq``."""
        out: list[dict[str, Any]] = []
        with self._lock:                     # the segments' files stay open while we read
            n = len(self._offsets)
            firsts = [s.first for s in self._segs]
            spans = []
            for seq in seqs:
                pos = seq - self._base
                if 0 <= pos < n:
                    seg = bisect.bisect_right(firsts, pos) - 1
                    spans.append((seq, seg, self._offsets[pos], self._lengths[pos]))
            i = 0
            while i < len(spans):
                # lines next to each other in one file are read in one go
                j = i + 1
                while (j < len(spans) and spans[j][1] == spans[i][1]
                       and spans[j - 1][2] < spans[j][2] <= spans[j - 1][2] + spans[j - 1][3] + 1
                       and j - i < 4096):
                    j += 1
                start = spans[i][2]
                fd = self._segs[spans[i][1]].fd
                try:
                    block = os.pread(fd, spans[j - 1][2] + spans[j - 1][3] - start, start)
                except OSError as exc:
                    log.warning("cannot read %s: %s", self.path, exc)
                    block = b""
                for seq, _, off, length in spans[i:j]:
                    try:
                        rec = json.loads(block[off - start: off - start + length])
                    except ValueError:
                        continue
                    if isinstance(rec, dict):
                        rec["seq"] = seq
                        out.append(rec)
                i = j
        return out

    def max_steps(self) -> dict[int, int]:
        """The highest step each job reached in the indexed history ({job_id: step}; records without
        a job or a step left out). Kept up to date incrementally: a scan only of what is new, all
        of it again after a rotation dropped the oldest file or the history was replaced."""
        with self._lock:
            key, upto, top = self._top
            if key != (self.generation, self._base) or upto > len(self._steps):
                key, upto, top = (self.generation, self._base), 0, {}
            jobs, steps = self._jobs, self._steps
            for i in range(upto, len(steps)):
                j, s = jobs[i], steps[i]
                if j >= 0 and s > top.get(j, -1):
                    top[j] = s
            self._top = (key, len(steps), top)
            return dict(top)

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
            base = self._base

            def match(i: int) -> bool:
                if job_id is not None and self._jobs[i] != job_id:
                    return False
                if since_step is not None and self._steps[i] <= since_step:
                    return False
                return True

            picked: list[int] = []
            more = False
            if since_seq is not None:
                i = max(since_seq - base + 1, 0)
                while i < n:
                    if match(i):
                        if len(picked) == limit:
                            more = True
                            break
                        picked.append(i)
                    i += 1
                next_seq = base + (picked[-1] if picked and more else n - 1)
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
                next_seq = base + n - 1
            gen = self.generation
            records = self.read([base + i for i in picked])
        return MetricsQuery(records=records, total=base + n, next_seq=next_seq, more=more,
                            generation=gen)

    def since(self, seq: int, limit: int = 5000) -> list[dict[str, Any]]:
        """Records after *seq* (for the stream), at most *limit* (the newest of them)."""
        with self._lock:
            n = len(self._offsets)
            first = max(seq - self._base + 1, n - limit, 0)
            return self.read([self._base + i for i in range(first, n)])


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
