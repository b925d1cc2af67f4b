"""The forgetting matrix: how each adapter did on the retention sets of the datasets before it.

After every job the worker evaluates the new adapter on the last K datasets' retention sets
(trainer/retention_eval.py) and sends the rows; the daemon keeps them in state.db's
``retention_evals`` table (one row per adapter and dataset) and writes ``status/eval.json``;
``trainer-ctl eval`` prints it. Rows: datasets; columns: the adapter after each job; a cell: the
eval loss, and its change since the adapter that had just learned that dataset (for the reference
set, row 0, since the base model alone).
"""
from __future__ import annotations

import sqlite3
import time
from typing import Any

from core.statedb import StateDB

REFERENCE_JOB = 0       # the reference set's row (reference_eval_file): its change is since the base alone

SCHEMA = """
CREATE TABLE IF NOT EXISTS retention_evals (
    after_job INTEGER NOT NULL,
    after_name TEXT,
    dataset_job INTEGER NOT NULL,
    dataset TEXT,
    loss REAL,
    tokens INTEGER,
    examples INTEGER,
    seconds REAL,
    skipped TEXT,
    baseline REAL,
    at REAL NOT NULL,
    PRIMARY KEY (after_job, dataset_job)
);
"""
COLUMNS = ("after_job", "after_name", "dataset_job", "dataset", "loss", "tokens", "examples", "seconds",
           "skipped", "baseline", "at")


def ensure(db: StateDB) -> None:
    """Create the table (the daemon at start, while there is room: never first at a job's end)."""
    db.conn.executescript(SCHEMA)


def add_rows(db: StateDB, after_job: int, after_name: str | None, rows: list[dict[str, Any]]) -> int:
    """Record one adapter's column (a retried job's evaluation replaces its earlier one)."""
    now = time.time()
    values = [(int(after_job), after_name, int(r["dataset_job"]), r.get("dataset"), r.get("loss"), r.get("tokens"),
               r.get("examples"), r.get("seconds"), r.get("skipped"), r.get("baseline"), now)
              for r in rows if isinstance(r, dict) and isinstance(r.get("dataset_job"), int)]
    ensure(db)
    with db.tx() as c:
        c.executemany(f"INSERT OR REPLACE INTO retention_evals ({', '.join(COLUMNS)}) VALUES "
                         f"({', '.join('?' * len(COLUMNS))})", values)
    return len(values)


def read_rows(db: StateDB) -> list[dict[str, Any]]:
    """Every row, oldest adapter first ([] before the first evaluation)."""
    try:
        cur = db.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM retention_evals ORDER BY after_job, dataset_job")
    except sqlite3.OperationalError:          # no such table yet
        return []
    return [dict(zip(COLUMNS, r)) for r in cur.fetchall()]


def matrix(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The matrix as JSON: ``columns`` (adapters, by the job that made them) and ``datasets``, each
    with one cell per column it was evaluated in: loss, change since it was learned, tokens."""
    columns: dict[int, str | None] = {}
    datasets: dict[int, dict[str, Any]] = {}
    for r in rows:
        columns.setdefault(r["after_job"], r["after_name"])
        d = datasets.setdefault(r["dataset_job"], {"job_id": r["dataset_job"], "name": r["dataset"], "cells": {}})
        d["cells"][r["after_job"]] = r
    out = []
    for job_id in sorted(datasets):
        d = datasets[job_id]
        if job_id == REFERENCE_JOB:         # the reference set: since the base model alone
            first = d["cells"][min(d["cells"])]
            learned = next((c["baseline"] for c in d["cells"].values() if c.get("baseline") is not None),
                           first.get("loss"))
        else:
            learned = (d["cells"].get(job_id) or {}).get("loss")      # right after it was trained
        cells = []
        for after in sorted(d["cells"]):
            r = d["cells"][after]
            loss = r.get("loss")
            cells.append({"after_job": after, "loss": loss, "tokens": r.get("tokens"), "skipped": r.get("skipped"),
                          "change": None if loss is None or learned is None else loss - learned,
                          "relative_change": None if loss is None or not learned else (loss - learned) / learned})
        out.append({"job_id": job_id, "name": d["name"], "learned_loss": learned, "cells": cells})
    return {"columns": [{"after_job": j, "name": columns[j]} for j in sorted(columns)], "datasets": out,
            "updated_at": time.time()}


def render(m: dict[str, Any]) -> list[str]:
    """The matrix as text lines: one row per dataset, one column per adapter."""
    cols = [c["after_job"] for c in m["columns"]]
    if not cols:
        return ["no retention evaluations yet: they appear after the first job with eval_fraction > 0"]
    width = 18
    head = f"{'dataset':<28}" + "".join(f"{'after job ' + str(j):>{width}}" for j in cols)
    lines = [head, "-" * len(head)]
    for d in m["datasets"]:
        by_col = {c["after_job"]: c for c in d["cells"]}
        label = (d["name"] or "?")[:26] + ("" if d["job_id"] == REFERENCE_JOB else f" #{d['job_id']}")
        text = f"{label:<28}"
        for j in cols:
            c = by_col.get(j)
            if c is None:
                cell = ""
            elif c["loss"] is None:
                cell = "skipped" if c.get("skipped") else "n/a"
            elif c["change"] is None or (j == d["job_id"] and j != REFERENCE_JOB):
                cell = f"{c['loss']:.4f}"
            else:
                cell = f"{c['loss']:.4f} ({c['change']:+.4f})"
            text += f"{cell:>{width}}"
        lines.append(text)
    return lines
