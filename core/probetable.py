"""Probe answers: what the model says to a few fixed prompts, over time.

The worker generates a greedy answer for every probe prompt (trainer/probes.py) at the base (the
adapter disabled, once per base and prompt), every ``probe_every_steps`` and at the end of every
job, and sends one ``probe`` event per round::

    {"event": "probe", "step": 12, "job_id": 3, "phase": "base" | "step" | "end", "seconds": 0.8,
     "probes": [{"prompt": "...", "answer": "...", "reference": "..." | None,
                 "source": "config" | "<dataset name>"}]}

The daemon keeps each answer as one row of state.db's ``probes`` table (``add``); GET
/api/samples shows them per prompt, oldest first (``series``). A round sent again (a retried job
redoing its end) replaces its rows. Stdlib only: the daemon, the worker (which reads which base
answers exist) and the monitor use it.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from core.statedb import StateDB

PHASES = ("base", "step", "end")
CONFIG_SOURCE = "config"        # a prompt from probe_prompts; else the dataset whose retention set it is from

SCHEMA = """
CREATE TABLE IF NOT EXISTS probes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,          -- the job that ran the round
    dataset TEXT,                     -- that job's file
    step INTEGER NOT NULL,            -- the job's step (0 for the base)
    phase TEXT NOT NULL,              -- base | step | end
    base_fingerprint TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL,
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    reference TEXT,
    seconds REAL,                     -- the whole round's
    at REAL NOT NULL,
    UNIQUE (job_id, phase, step, source, prompt)
);
CREATE INDEX IF NOT EXISTS probes_base ON probes(phase, base_fingerprint);
"""
COLUMNS = ("id", "job_id", "dataset", "step", "phase", "base_fingerprint", "source", "prompt", "answer",
           "reference", "seconds", "at")


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def ensure(db: StateDB) -> None:
    """Create the table (the daemon at start, while there is room: never first at a job's end)."""
    db.conn.executescript(SCHEMA)


def add(db: StateDB, ev: dict[str, Any], *, dataset: str | None, base_fingerprint: str | None) -> int:
    """Record one ``probe`` event's answers; returns how many rows it wrote."""
    job_id, step, phase = ev.get("job_id"), ev.get("step"), ev.get("phase")
    if not isinstance(job_id, int) or not isinstance(step, int) or phase not in PHASES:
        return 0
    seconds = ev.get("seconds") if isinstance(ev.get("seconds"), (int, float)) else None
    now = time.time()
    rows = [(job_id, dataset, step, phase, base_fingerprint or "", _text(p.get("source")) or CONFIG_SOURCE,
             p["prompt"], p["answer"], _text(p.get("reference")), seconds, now)
            for p in ev.get("probes") or []
            if isinstance(p, dict) and isinstance(p.get("prompt"), str) and isinstance(p.get("answer"), str)]
    ensure(db)
    with db.tx() as c:
        c.executemany(f"INSERT OR REPLACE INTO probes ({', '.join(COLUMNS[1:])}) VALUES "
                      f"({', '.join('?' * (len(COLUMNS) - 1))})", rows)
    return len(rows)


def read_rows(db: StateDB, per_prompt: int | None = None) -> list[dict[str, Any]]:
    """Answers oldest first ([] before the first), each with ``total``: its prompt's answer count.
    With *per_prompt*, of each prompt only its first answer and its newest ``per_prompt - 1``."""
    cols = ", ".join(COLUMNS)
    keep = max(2, int(per_prompt)) if per_prompt else None
    try:
        cur = db.conn.execute(
            f"SELECT {cols}, total FROM (SELECT {cols}, COUNT(*) OVER p AS total, "
            "ROW_NUMBER() OVER (p ORDER BY id) AS fwd, ROW_NUMBER() OVER (p ORDER BY id DESC) AS back "
            "FROM probes WINDOW p AS (PARTITION BY source, prompt)) WHERE ? IS NULL OR fwd = 1 OR back < ? "
            "ORDER BY id", (keep, keep))
    except sqlite3.OperationalError:          # no such table yet
        return []
    return [dict(zip(COLUMNS + ("total",), r)) for r in cur.fetchall()]


def recorded_base(state_db: Path, base_fingerprint: str) -> set[tuple[str, str]]:
    """(source, prompt) of every base answer recorded for this base; read-only, never raises
    (no state.db, no table yet, a locked file: nothing is known)."""
    if not Path(state_db).is_file():
        return set()
    try:
        conn = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=5)
        try:
            cur = conn.execute("SELECT source, prompt FROM probes WHERE phase = 'base' "
                               "AND base_fingerprint = ?", (base_fingerprint,))
            return {(s, p) for s, p in cur.fetchall()}
        finally:
            conn.close()
    except sqlite3.Error:
        return set()


def series(rows: list[dict[str, Any]], max_prompts: int | None = None) -> list[dict[str, Any]]:
    """Per prompt its answers, oldest first, and its reference answer when it has one: the
    configured prompts first (in the order they were first answered), then the others, the newest
    dataset's first; at most *max_prompts*. ``omitted``: the answers ``read_rows`` left out."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault((r["source"], r["prompt"]), {"prompt": r["prompt"], "source": r["source"],
                                                           "reference": None, "total": 0, "answers": []})
        if r.get("reference") is not None:
            g["reference"] = r["reference"]
        g["total"] = max(g["total"], int(r.get("total") or 0))
        g["answers"].append({k: r[k] for k in ("id", "answer", "phase", "step", "job_id", "dataset", "at")})
    def order(g: dict[str, Any]) -> tuple[bool, int]:
        first = g["answers"][0]["id"]
        return (False, first) if g["source"] == CONFIG_SOURCE else (True, -first)
    out = sorted(groups.values(), key=order)
    for g in out:
        g["total"] = max(g["total"], len(g["answers"]))
        g["omitted"] = g["total"] - len(g["answers"])
    return out[:max_prompts] if max_prompts else out


def prune(db: StateDB, keep: int) -> int:
    """Keep the newest *keep* answers; returns how many were removed."""
    try:
        with db.tx() as c:
            cur = c.execute("DELETE FROM probes WHERE id <= (SELECT id FROM probes ORDER BY id DESC "
                            "LIMIT 1 OFFSET ?)", (int(keep),))
            return cur.rowcount
    except sqlite3.OperationalError:          # no such table yet
        return 0
