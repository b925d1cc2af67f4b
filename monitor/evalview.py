"""The Retention panel's data: the forgetting matrix with each adapter's fate marked.

The matrix is core/evaltable.py's, built from state.db's ``retention_evals`` table (opened
read-only, as every monitor reader does). Each column is the adapter one job made; what became of
it comes from state.db's events:

- ``held``: the promotion gate held the adapter back (a ``held`` event of that job; its verdict
  is the reason, its snapshot the candidate ``trainer-ctl promote`` takes);
- ``promoted``: ``trainer-ctl promote`` or ``rollback`` later made it current_model/ (the last
  ``promoted`` / ``rolled_back`` event whose snapshot is that job's: found by the ``snapshot`` and
  ``held`` events, else by the snapshot's own ``snapshot.json``);
- ``current``: current_model/ is that adapter now (its ``trainer_state.json``'s last dataset).

The events are read incrementally (by id), the matrix again only when its table changed, so the
stream can ask on every change of state.db.
"""
from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from datetime import datetime
from pathlib import PurePath
from typing import Any

from core import evaltable
from core.artifacts import SNAPSHOT_META, TRAINER_STATE
from core.atomic import read_json
from core.config import Config
from core.paths import Layout
from core.statedb import StateDB
from monitor.readers import NoDatabase, open_db, stat_key

log = logging.getLogger("monitor.eval")

MARK_KINDS = ("held", "gate_passed", "snapshot", "promoted", "rolled_back")
NO_EVALS = "no retention evaluations yet: they appear after the first job with eval_fraction > 0"
DEFAULT_COLUMNS = 50


def _iso(ts: Any) -> str | None:
    try:
        return datetime.fromtimestamp(float(ts)).astimezone().isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _finite(v: Any) -> float | None:
    """A loss as JSON can carry it: NaN and inf are no number (shown as "n/a")."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _snapshot_name(path: Any) -> str | None:
    """The folder name of a snapshot path as an event records it (absolute or relative)."""
    if not isinstance(path, str) or not path.strip():
        return None
    name = PurePath(path.replace("\\", "/")).name
    return name if name and not name.startswith(".") else None


def no_evals_reason(config: Config | None) -> str:
    """Why there is no matrix, in words: evaluation off in config.json, or no job evaluated yet."""
    if config is not None:
        if config.eval_fraction <= 0:
            return ("no retention evaluations: eval_fraction is 0 in config.json (set it > 0, e.g. 0.02, "
                    "and each new file keeps a retention set)")
        if config.retention_eval_datasets <= 0:
            return "no retention evaluations: retention_eval_datasets is 0 in config.json"
    return NO_EVALS


class EvalView:
    """The /api/eval payload for one base dir; safe to share between requests and streams."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._lock = threading.Lock()
        self._reset(None)
        self._rows_key: Any = "unset"
        self._matrix: dict[str, Any] = evaltable.matrix([])

    def _reset(self, ino: int | None) -> None:
        self._db_ino = ino
        self._event_id = 0
        self._held: dict[int, dict[str, Any]] = {}
        self._gate: dict[int, str] = {}
        self._snap_job: dict[str, int] = {}
        self._moves: list[dict[str, Any]] = []

    # ---- reading state.db -----------------------------------------------------------------------
    def _scan_events(self, db: StateDB) -> None:
        """Take in the mark events written since the last call (all of them after a new state.db)."""
        key = stat_key(self.layout.state_db)
        ino = key[0] if key else None
        last = db.conn.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0
        if ino != self._db_ino or last < self._event_id:
            self._reset(ino)
        if last == self._event_id:
            return
        marks = ", ".join("?" * len(MARK_KINDS))
        rows = db.conn.execute(
            f"SELECT id, ts, kind, job_id, message, data FROM events WHERE id > ? AND id <= ? "
            f"AND kind IN ({marks}) ORDER BY id", (self._event_id, last, *MARK_KINDS)).fetchall()
        for ev_id, ts, kind, job_id, message, raw in rows:
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                data = {}
            self._take(kind, job_id, message, data if isinstance(data, dict) else {}, ts)
        self._event_id = last

    def _take(self, kind: str, job_id: Any, message: str, data: dict[str, Any], ts: Any) -> None:
        job = job_id if isinstance(job_id, int) else None
        if kind == "snapshot" and job is not None:
            name = _snapshot_name(data.get("path"))
            if name:
                self._snap_job[name] = job
        elif kind == "held" and job is not None:
            name = _snapshot_name(data.get("snapshot"))
            if name:
                self._snap_job[name] = job
            reason = data.get("summary") if isinstance(data.get("summary"), str) else None
            self._held[job] = {"reason": reason or str(message), "snapshot": name, "at": _iso(ts)}
            self._gate[job] = reason or "held"
        elif kind == "gate_passed" and job is not None:
            self._gate[job] = str(data.get("summary") or message)
        elif kind in ("promoted", "rolled_back"):
            self._moves.append({"kind": kind, "snapshot": _snapshot_name(data.get("snapshot")),
                                "at": data.get("at") if isinstance(data.get("at"), str) else _iso(ts),
                                "message": str(message)})

    def _read_matrix(self, db: StateDB) -> dict[str, Any]:
        try:
            key = tuple(db.conn.execute("SELECT COUNT(*), MAX(at) FROM retention_evals").fetchone())
        except sqlite3.OperationalError:          # no such table: no job was evaluated yet
            key = None
        if key != self._rows_key:
            self._matrix = evaltable.matrix(evaltable.read_rows(db) if key else [])
            self._rows_key = key
        return self._matrix

    # ---- which job made a snapshot, which adapter is live ---------------------------------------
    def _job_of_snapshot(self, name: str | None) -> int | None:
        if not name:
            return None
        if name in self._snap_job:
            return self._snap_job[name]
        try:      # a name from state.db, looked up under snapshots/ only (no separators, no dot files)
            meta = read_json(self.layout.snapshots / name / SNAPSHOT_META, {})
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
        job = meta.get("job_id")
        if not isinstance(job, int):       # a pre-promote / pre-rollback backup: its last dataset
            sets = [d for d in meta.get("datasets") or [] if isinstance(d, dict)]
            job = sets[-1].get("job_id") if sets else None
        if isinstance(job, int):
            self._snap_job[name] = job
            return job
        return None

    def _current_job(self) -> int | None:
        try:
            state = read_json(self.layout.current_model / TRAINER_STATE, {})
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict):
            return None
        sets = [d for d in state.get("datasets") or [] if isinstance(d, dict)]
        job = sets[-1].get("job_id") if sets else None
        return job if isinstance(job, int) else None

    # ---- the payload ----------------------------------------------------------------------------
    def read(self, *, columns: int = DEFAULT_COLUMNS, config: Config | None = None) -> dict[str, Any]:
        """The matrix (the newest *columns* adapters, and the datasets evaluated in them) with each
        column's marks; or ``available: false`` and a plain reason."""
        with self._lock:
            try:
                db = open_db(self.layout)
            except NoDatabase as exc:
                return empty(str(exc))
            try:
                self._scan_events(db)
                m = self._read_matrix(db)
            except sqlite3.Error as exc:
                return empty(f"status/state.db could not be read: {exc}")
            finally:
                db.close()
            if not m["columns"]:
                return empty(no_evals_reason(config))
            return self._payload(m, max(1, columns))

    def _payload(self, m: dict[str, Any], limit: int) -> dict[str, Any]:
        moved: dict[int, dict[str, Any]] = {}
        for mv in self._moves:              # oldest first: the last move to an adapter wins
            job = self._job_of_snapshot(mv["snapshot"])
            if job is not None:
                moved[job] = mv
        current = self._current_job()
        shown = m["columns"][-limit:]
        keep = {c["after_job"] for c in shown}
        cols = [{"after_job": c["after_job"], "name": c["name"], "held": self._held.get(c["after_job"]),
                 "promoted": moved.get(c["after_job"]), "gate": self._gate.get(c["after_job"]),
                 "current": c["after_job"] == current} for c in shown]
        datasets = []
        for d in m["datasets"]:
            cells = [{"after_job": c["after_job"], "loss": _finite(c["loss"]), "change": _finite(c["change"]),
                      "relative_change": _finite(c["relative_change"]), "tokens": c.get("tokens"),
                      "skipped": c.get("skipped")} for c in d["cells"] if c["after_job"] in keep]
            if cells:
                datasets.append({"job_id": d["job_id"], "name": d["name"],
                                 "reference": d["job_id"] == evaltable.REFERENCE_JOB,
                                 "learned_loss": _finite(d["learned_loss"]), "cells": cells})
        total = len(m["columns"])
        return {"available": True, "reason": None, "columns": cols, "datasets": datasets,
                "total_columns": total, "hidden_columns": total - len(cols), "current_job": current,
                "updated_at": self._rows_key[1] if isinstance(self._rows_key, tuple) else None}


def empty(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason, "columns": [], "datasets": [], "total_columns": 0,
            "hidden_columns": 0, "current_job": None, "updated_at": None}
