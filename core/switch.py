"""The journalled switch of the base: recovery of a consolidation a crash interrupted.

A consolidation (ops/consolidate.py) publishes a new base folder, then switches to it in steps
journalled in ``status/consolidation.json``: (b) ``current_model/`` -> the backup snapshot
``snapshots/<ts>__pre-consolidation/``, (c) config.json names the new base (the commit point),
(d) state.db's locked ``base_model`` follows, (e) the backup's ``snapshot.json``, then the journal
is removed. ``recover_consolidation`` (run by the daemon at start, and by every operation first)
rolls back while config.json names the old base and forward once it names the new one, and
removes ``consolidated_models/.tmp-*`` leftovers. ``status/.consolidation.lock`` (flock)
serialises consolidation and recovery. Stdlib only, so the daemon can recover without the trainer.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from core.artifacts import BACKUP_SUFFIX, CONSOLIDATION_META, SNAPSHOT_META, TRAINER_STATE  # noqa: F401
from core.atomic import atomic_write_json, durable_rename, fsync_dir, read_json
from core.config import base_model_value, locked_namespace
from core.paths import Layout, resolve_under
from core.statedb import StateDB

log = logging.getLogger("core.switch")

JOURNAL_NAME = "consolidation.json"          # under status/
LOCK_NAME = ".consolidation.lock"            # under status/


class ConsolidationError(RuntimeError):
    """Consolidation refused or failed; the message says why (state is left as it was)."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def flock_nb(path: Path) -> int | None:
    """A non-blocking exclusive flock on *path*: the fd, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


@contextmanager
def consolidation_lock(home: Path) -> Iterator[bool]:
    """Hold status/.consolidation.lock; yields False (holding nothing) if another process has it."""
    fd = flock_nb(Layout(Path(home)).status_dir / LOCK_NAME)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def read_config_raw(home: Path) -> dict[str, Any]:
    path = Layout(Path(home)).config
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ConsolidationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConsolidationError(f"{path} must hold a JSON object")
    return raw


def dataset_entries(state: dict[str, Any]) -> list[dict[str, Any]]:
    keep = ("name", "sha256", "job_id", "steps", "final_loss", "eval_loss", "examples",
            "trained_tokens", "completed_at")
    return [{k: d.get(k) for k in keep if k in d} for d in (state.get("datasets") or [])
            if isinstance(d, dict)]


def journal_path(home: Path) -> Path:
    return Layout(Path(home)).status_dir / JOURNAL_NAME


def ensure_locked_base(home: Path, value: str) -> bool:
    """state.db's locked base_model = *value*; True if it had to change."""
    ns = locked_namespace(read_config_raw(home))
    db = StateDB(Layout(Path(home)).state_db)
    try:
        if db.locked(ns).get("base_model") == value:
            return False
        db.unlock("base_model", ns)
        db.record_locked({"base_model": value}, ns)
        return True
    finally:
        db.close()


def add_event(home: Path, kind: str, message: str, data: dict[str, Any] | None = None,
               level: str = "info") -> None:
    try:
        db = StateDB(Layout(Path(home)).state_db)
        try:
            db.add_event(kind, message, level=level, data=data)
        finally:
            db.close()
    except Exception as exc:  # noqa: BLE001 - an event is a courtesy, never a failure
        log.warning("could not record event %s: %s", kind, exc)


def write_backup_meta(backup: Path, journal: dict[str, Any]) -> None:
    if not backup.is_dir() or (backup / SNAPSHOT_META).is_file():
        return
    state = read_json(backup / TRAINER_STATE, {}) or {}
    atomic_write_json(backup / SNAPSHOT_META, {
        "kind": "pre-consolidation", "description": journal.get("description"),
        "consolidated_into": journal.get("new_base"),
        "consolidated_fingerprint": journal.get("new_fingerprint"),
        "base_model": state.get("base_model"), "base_fingerprint": state.get("base_fingerprint"),
        "datasets": dataset_entries(state), "total_steps": state.get("total_steps"),
        "created_at": journal.get("started_at") or now_iso()})


def roll_forward(home: Path, journal: dict[str, Any]) -> None:
    """config.json names the new base: finish steps b, d, e of the switch."""
    layout = Layout(Path(home))
    backup = resolve_under(home, journal["backup"])
    assert backup is not None
    cur = layout.current_model
    if cur.exists() and not backup.exists():
        durable_rename(cur, backup)
    elif cur.exists():
        # Cannot happen through consolidate (b precedes c); a newer adapter is kept, never lost.
        log.warning("roll forward: both %s and %s exist; keeping both", cur, backup)
    ensure_locked_base(home, journal["new_base"])
    write_backup_meta(backup, journal)


def roll_back(home: Path, journal: dict[str, Any]) -> None:
    """config.json still names the old base: the adapter goes back to current_model/."""
    layout = Layout(Path(home))
    backup = resolve_under(home, journal["backup"])
    assert backup is not None
    if not layout.current_model.exists() and backup.is_dir():
        durable_rename(backup, layout.current_model)


def recover_locked(home: Path) -> str | None:
    layout = Layout(Path(home))
    actions: list[str] = []
    jpath = journal_path(home)
    journal = read_json(jpath) if jpath.exists() else None
    if jpath.exists() and not isinstance(journal, dict):
        journal = None
        log.error("unreadable consolidation journal %s: left in place for a human", jpath)
    if journal is not None:
        current = base_model_value(read_config_raw(home))
        if current == journal.get("new_base"):
            roll_forward(home, journal)
            actions.append("rolled_forward")
        else:
            if current != journal.get("old_base"):
                log.warning("config.json names %r, neither the old (%r) nor the new (%r) base of the "
                            "interrupted consolidation; restoring the adapter",
                            current, journal.get("old_base"), journal.get("new_base"))
            roll_back(home, journal)
            actions.append("rolled_back")
        jpath.unlink()
        fsync_dir(jpath.parent)
    if layout.consolidated.is_dir():
        for p in sorted(layout.consolidated.glob(".tmp-*")):
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed {p.name}")
        if any(a.startswith("removed") for a in actions):
            fsync_dir(layout.consolidated)
    if not actions:
        return None
    what = ", ".join(actions)
    log.warning("consolidation recovery: %s", what)
    if journal is not None:
        add_event(home, "consolidation_recovered",
                   f"interrupted consolidation {actions[0].replace('_', ' ')}: new base "
                   f"{journal.get('new_base')}, old base {journal.get('old_base')}",
                   data={"actions": actions, "journal": journal}, level="warning")
    return what


def recover_consolidation(home: Path) -> str | None:
    """Finish or undo an interrupted consolidation; what was done, or None if nothing was.

    Returns None too (with a log line) when another process is consolidating right now.
    """
    home = Path(home)
    with consolidation_lock(home) as held:
        if not held:
            log.info("a consolidation is in progress in another process; recovery skipped")
            return None
        return recover_locked(home)
