"""status/state.db: SQLite in WAL mode, the durable record of jobs, events and locked keys.

The queue folders are the truth for *where* a file is (a rename and a commit cannot be one
transaction); this database is the truth for everything else (hash, priority, attempts,
errors, history). ``FsQueue.reconcile`` makes the two agree at start-up.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from core.diskfull import is_disk_full
from core.datareport import normalize_data_report, parse_data_report  # noqa: F401 (re-exported)
from core.states import JobState, Priority

log = logging.getLogger("trainerd.statedb")
T = TypeVar("T")
Counts = dict[tuple[str, str], float]     # (counter name, labels as sorted JSON) -> amount to add


def counter_key(name: str, **labels: str) -> tuple[str, str]:
    """The key of one counter series in ``Counts``."""
    return name, json.dumps(labels, sort_keys=True, separators=(",", ":"))

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,          -- file name inside queue/<state>/
    original_name TEXT NOT NULL,
    sha256        TEXT,
    size          INTEGER,
    state         TEXT NOT NULL,
    priority      TEXT NOT NULL DEFAULT 'normal',
    seq           INTEGER NOT NULL,              -- FIFO order inside a priority
    resume        INTEGER NOT NULL DEFAULT 0,    -- 1: interrupted job, goes to the head
    attempts      INTEGER NOT NULL DEFAULT 0,    -- times claimed (shown as "attempt N")
    crashes       INTEGER NOT NULL DEFAULT 0,    -- attempts in a row that crashed without progress
    not_before    REAL,                          -- back-off after a crash: not claimed before this
    forced        INTEGER NOT NULL DEFAULT 0,
    duplicate_of  INTEGER REFERENCES jobs(id),
    error         TEXT,
    format        TEXT,
    records       INTEGER,
    steps         INTEGER,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    data_report   TEXT                           -- JSON: the worker's data report of the last attempt
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_sha ON jobs(sha256);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      REAL NOT NULL,
    level   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    job_id  INTEGER,
    message TEXT NOT NULL,
    data    TEXT
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    value REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (name, labels)
);
CREATE TABLE IF NOT EXISTS locked_keys (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,      -- JSON
    recorded_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    original_name: str
    sha256: str | None
    size: int | None
    state: str
    priority: str
    seq: int
    resume: bool
    attempts: int
    crashes: int
    not_before: float | None
    forced: bool
    duplicate_of: int | None
    error: str | None
    format: str | None
    records: int | None
    steps: int | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    data_report: str | None = None      # JSON text as stored; see report() and to_json()

    def report(self) -> dict[str, Any] | None:
        """The data report of the job's last attempt (parsed), or None if there is none yet."""
        return parse_data_report(self.data_report)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["data_report"] = self.report()
        return d


PENDING_ORDER = ("ORDER BY resume DESC, CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 "
                 "ELSE 2 END, seq")


class StateDB:
    """Thin, typed access to state.db. One connection per process/thread that opens it."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            self.conn = self._connect_readonly()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(SCHEMA)
            self._migrate()
        self.conn.row_factory = sqlite3.Row

    def _connect_readonly(self) -> sqlite3.Connection:
        def connect(flags: str) -> sqlite3.Connection:
            return sqlite3.connect(f"file:{self.path}?mode=ro{flags}", uri=True, timeout=10,
                                   isolation_level=None, check_same_thread=False)
        conn = connect("")
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            wal = self.path.with_name(self.path.name + "-wal")
            if not is_disk_full(exc) or (wal.exists() and wal.stat().st_size > 0):
                raise
        # a full disk and no writer: no room for the -shm index that reading a WAL database
        # makes; with no WAL left (the last writer closed cleanly) the file is the whole database
        return connect("&immutable=1")

    # columns added after the first release: (name, SQL type + default, value in a file without it)
    _ADDED_COLUMNS = (("crashes", "INTEGER NOT NULL DEFAULT 0", 0), ("not_before", "REAL", None),
                      ("data_report", "TEXT", None))

    def _migrate(self) -> None:
        have = {row[1] for row in self.conn.execute("PRAGMA table_info(jobs)")}
        for name, decl, _ in self._ADDED_COLUMNS:
            if name not in have:
                self.conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:       # SQLite may have rolled back already (SQLITE_FULL)
                pass

    def commit_with(self, change: Callable[[sqlite3.Connection], T], effect: Callable[[], None],
                    undo: Callable[[], None]) -> T:
        """Row change and file-system effect together, or neither.

        ``change`` runs inside a transaction, then ``effect`` (one rename); then COMMIT. If the
        change or the effect fails, the transaction rolls back; if the COMMIT fails (a full disk),
        ``undo`` reverses the effect before the error propagates. A crash between the effect and
        the commit leaves the folder ahead of the row, which start-up reconciliation repairs.
        """
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            out = change(self.conn)
            effect()
        except BaseException:
            self._rollback()
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            try:
                undo()
            finally:
                self._rollback()
            raise
        return out

    # ---- jobs -------------------------------------------------------------------------
    def _job(self, row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        d = dict(row)
        for name, _, value in self._ADDED_COLUMNS:   # a read-only reader of a file not yet migrated
            d.setdefault(name, value)
        d["resume"], d["forced"] = bool(d["resume"]), bool(d["forced"])
        return Job(**d)

    def next_seq(self) -> int:
        row = self.conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
        return int(row[0])

    def insert_job(self, *, name: str, original_name: str, state: JobState, sha256: str | None,
                   size: int | None, priority: Priority = Priority.NORMAL, forced: bool = False,
                   duplicate_of: int | None = None, error: str | None = None,
                   fmt: str | None = None, records: int | None = None) -> Job:
        with self.tx() as c:
            job_id = self.insert_job_in(c, name=name, original_name=original_name, state=state,
                                        sha256=sha256, size=size, priority=priority, forced=forced,
                                        duplicate_of=duplicate_of, error=error, fmt=fmt, records=records)
        job = self.get(job_id)
        assert job is not None
        return job

    def insert_job_in(self, c: sqlite3.Connection, *, name: str, original_name: str, state: JobState,
                      sha256: str | None, size: int | None, priority: Priority = Priority.NORMAL,
                      forced: bool = False, duplicate_of: int | None = None, error: str | None = None,
                      fmt: str | None = None, records: int | None = None) -> int:
        """INSERT a job inside the caller's transaction; returns its id."""
        now = time.time()
        cur = c.execute(
            "INSERT INTO jobs (name, original_name, sha256, size, state, priority, seq, forced,"
            " duplicate_of, error, format, records, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (name, original_name, sha256, size, state.value, priority.value, self.next_seq(),
             int(forced), duplicate_of, error, fmt, records, now, now))
        return int(cur.lastrowid)

    def update(self, job_id: int, **fields: Any) -> None:
        if not fields:
            return
        with self.tx() as c:
            self.update_in(c, job_id, **fields)

    @staticmethod
    def update_in(c: sqlite3.Connection, job_id: int, **fields: Any) -> None:
        """UPDATE a job inside the caller's transaction."""
        fields["updated_at"] = time.time()
        for k, v in list(fields.items()):
            if isinstance(v, (JobState, Priority)):
                fields[k] = v.value
            elif isinstance(v, bool):
                fields[k] = int(v)
        cols = ", ".join(f"{k} = ?" for k in fields)
        c.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def set_data_report(self, job_id: int, report: Any) -> bool:
        """Store the data report of the job's current attempt (replacing an earlier attempt's).
        Not a JSON object: nothing stored, False. On a full disk the report is lost with a warning
        (like an event): it must not stop the training it describes."""
        norm = normalize_data_report(report)
        if norm is None:
            return False
        try:
            self.update(job_id, data_report=json.dumps(norm, default=str))
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            log.warning("data report of job %s not recorded in state.db (%s)", job_id, exc)
            return False
        return True

    def get(self, job_id: int) -> Job | None:
        return self._job(self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def by_name(self, name: str) -> Job | None:
        return self._job(self.conn.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone())

    def by_original_name(self, name: str) -> Job | None:
        """The newest job whose file arrived as *name* (before safe_name)."""
        return self._job(self.conn.execute("SELECT * FROM jobs WHERE original_name = ? ORDER BY id DESC LIMIT 1",
                                           (name,)).fetchone())

    def name_taken(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM jobs WHERE name = ?", (name,)).fetchone() is not None

    def jobs(self, state: JobState | None = None, *, limit: int = -1, newest_first: bool = False) -> list[Job]:
        """Jobs in queue order (pending: training order; others: by id), at most *limit* (-1: all)."""
        order = "ORDER BY id DESC" if newest_first else "ORDER BY id"
        if state is None:
            rows = self.conn.execute(f"SELECT * FROM jobs {order} LIMIT ?", (limit,)).fetchall()
        elif state is JobState.PENDING:
            rows = self.conn.execute(f"SELECT * FROM jobs WHERE state = 'pending' {PENDING_ORDER} LIMIT ?",
                                     (limit,)).fetchall()
        else:
            rows = self.conn.execute(f"SELECT * FROM jobs WHERE state = ? {order} LIMIT ?",
                                     (state.value, limit)).fetchall()
        return [j for j in map(self._job, rows) if j is not None]

    def next_pending(self, now: float | None = None) -> Job | None:
        """The job to train next: the head of pending/ among those not backing off after a crash."""
        now = time.time() if now is None else now
        return self._job(self.conn.execute(
            "SELECT * FROM jobs WHERE state = 'pending' AND (not_before IS NULL OR not_before <= ?) "
            f"{PENDING_ORDER} LIMIT 1", (now,)).fetchone())

    def has_pending(self) -> bool:
        """Any job in pending/, including one backing off."""
        return self.conn.execute("SELECT 1 FROM jobs WHERE state = 'pending' LIMIT 1").fetchone() is not None

    def find_trained_or_queued(self, sha256: str) -> Job | None:
        """The first job with this content that is queued, running or done (not failed)."""
        return self._job(self.conn.execute(
            "SELECT * FROM jobs WHERE sha256 = ? AND state IN ('pending','processing','done')"
            " AND duplicate_of IS NULL ORDER BY id LIMIT 1", (sha256,)).fetchone())

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobState}
        for row in self.conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[row[0]] = row[1]
        return out

    # ---- counters (monotonic totals for /metrics; only ever added to) ---------------------
    @staticmethod
    def add_counts_in(c: sqlite3.Connection, counts: Counts) -> None:
        c.executemany("INSERT INTO counters (name, labels, value) VALUES (?, ?, ?) ON CONFLICT(name, labels) "
                      "DO UPDATE SET value = value + excluded.value",
                      [(name, labels, by) for (name, labels), by in counts.items() if by])

    def add_counts(self, counts: Counts) -> None:
        if any(counts.values()):
            with self.tx() as c:
                self.add_counts_in(c, counts)

    def counters(self) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of every counter; [] for a state.db from before counters."""
        try:
            rows = self.conn.execute("SELECT name, labels, value FROM counters ORDER BY name, labels").fetchall()
        except sqlite3.OperationalError:
            return []
        return [(r[0], json.loads(r[1]), r[2]) for r in rows]

    # ---- events -----------------------------------------------------------------------
    def add_event(self, kind: str, message: str, *, level: str = "info", job_id: int | None = None,
                  data: dict[str, Any] | None = None) -> None:
        """Record an event. On a full disk the event goes to the log only: losing a line of
        history must not undo (or block) the state change it describes."""
        try:
            with self.tx() as c:
                c.execute("INSERT INTO events (ts, level, kind, job_id, message, data) VALUES (?,?,?,?,?,?)",
                          (time.time(), level, kind, job_id, message,
                           json.dumps(data, default=str) if data else None))
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            log.warning("event not recorded in state.db (%s): %s %s", exc, kind, message)

    def events(self, limit: int = 100, since_id: int = 0) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM events WHERE id > ? ORDER BY id DESC LIMIT ?",
                                 (since_id, limit)).fetchall()
        out = []
        for r in reversed(rows):
            d = dict(r)
            d["data"] = json.loads(d["data"]) if d["data"] else None
            out.append(d)
        return out

    # ---- locked config keys (one namespace per preset; "" when none is active) ------------------
    @staticmethod
    def _lk(key: str, ns: str) -> str:
        return f"preset:{ns}:{key}" if ns else key

    def locked(self, ns: str = "") -> dict[str, Any]:
        rows = self.conn.execute("SELECT * FROM locked_keys").fetchall()
        prefix = f"preset:{ns}:" if ns else None
        out = {}
        for r in rows:
            k = r["key"]
            if prefix is None and not k.startswith("preset:"):
                out[k] = json.loads(r["value"])
            elif prefix is not None and k.startswith(prefix):
                out[k[len(prefix):]] = json.loads(r["value"])
        return out

    def record_locked(self, values: dict[str, Any], ns: str = "") -> None:
        with self.tx() as c:
            for k, v in values.items():
                c.execute("INSERT OR IGNORE INTO locked_keys (key, value, recorded_at) VALUES (?,?,?)",
                          (self._lk(k, ns), json.dumps(v), time.time()))

    def unlock(self, key: str, ns: str = "") -> bool:
        with self.tx() as c:
            return c.execute("DELETE FROM locked_keys WHERE key = ?", (self._lk(key, ns),)).rowcount > 0
