"""``MetricsIndex``: status/metrics.jsonl and its rotated files (metrics.jsonl.N, older first),
indexed incrementally; a rotation while it indexes is followed by inode. Only complete lines
(ending in a newline) are indexed, so a torn last line is picked up once it is complete.
The index keeps offsets and a few numbers per line (~40 bytes), never the parsed records, so a
100 MB file costs a few MB; a query reads just the lines it returns.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.status import rotated_metrics

log = logging.getLogger("monitor.readers")


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
