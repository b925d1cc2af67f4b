"""The promotion gate's judgement, and the journalled move of current_model/ to a snapshot.

The gate (``promotion_gate`` in config.json; the worker calls ``judge`` in trainer/gate.py): every
published adapter keeps, in its ``trainer_state.json`` under ``"retention"``, the retention losses
it got right after its job (trainer/retention_eval.py). A new adapter is compared, dataset by
dataset, with the adapter it would replace, i.e. with the losses recorded in the current
``current_model/``: ``(new - reference) / reference`` above ``max_retention_regression`` on any
earlier dataset holds it back. The job's own dataset has no earlier value and is not gated; a
dataset the current adapter has no loss for (evaluated first now, skipped, or an adapter made
before the gate) is listed as unchecked, never guessed.

The move (``switch_current``: ``trainer-ctl promote`` and ``rollback``), journalled in
``status/promotion.json`` like the consolidation's switch (core/switch.py):

1. journal ``{"action", "snapshot", "staged", "backup", "had_current", ...}`` (atomic);
2. ``current_model.switch/``: the snapshot's files (not its snapshot.json) with a manifest;
3. rename ``current_model/`` -> ``snapshots/<ts>__pre-<action>/`` (the old adapter is kept);
4. rename ``current_model.switch/`` -> ``current_model/`` (the commit point);
5. the backup's ``snapshot.json``, an event in state.db, then the journal is removed.

``recover_promotion`` (the daemon at start, and every promote/rollback first) rolls forward once
step 4 is done (or the staged folder is complete and current_model/ is gone) and back otherwise,
so a SIGKILL anywhere leaves the old or the new adapter in current_model/, never none or a mix.
Stdlib only: the daemon recovers without the trainer.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from core.artifacts import MANIFEST, SNAPSHOT_META, TRAINER_STATE, fill_dir, is_complete
from core.atomic import atomic_write_json, durable_rename, fsync_dir, read_json
from core.paths import Layout, resolve_under
from core.switch import add_event, dataset_entries, now_iso

log = logging.getLogger("core.promotion")

RETENTION_KEY = "retention"           # trainer_state.json: {"after_job", "losses": {"<job id>": loss}}
JOURNAL_NAME = "promotion.json"       # under status/
STAGED_NAME = "current_model.switch"
HELD_KIND = "held"                    # snapshot.json "kind" of an adapter the gate held back
ACTIONS = ("promote", "rollback")
EVENT_KIND = {"promote": "promoted", "rollback": "rolled_back"}
CRASH_POINTS = ("journal", "staged", "backup", "current")   # test hook of switch_current


# ============================================================================ the gate

def retention_record(out: dict[str, Any] | None) -> dict[str, Any] | None:
    """What an adapter keeps of its own retention eval (trainer/retention_eval.py's result)."""
    if not out:
        return None
    losses = {str(r["dataset_job"]): r["loss"] for r in out.get("rows") or []
              if isinstance(r, dict) and isinstance(r.get("dataset_job"), int)
              and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])}
    return {"after_job": out.get("after_job"), "losses": losses}


def reference_losses(state: dict[str, Any]) -> dict[int, float]:
    """The retention losses recorded with an adapter (its trainer_state.json), by dataset job id."""
    rec = state.get(RETENTION_KEY) if isinstance(state, dict) else None
    losses = rec.get("losses") if isinstance(rec, dict) else None
    if not isinstance(losses, dict):
        return {}
    out = {}
    for k, v in losses.items():
        try:
            out[int(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def judge(rows: list[dict[str, Any]], reference: dict[int, float], max_regression: float,
          own_job: int) -> dict[str, Any]:
    """The verdict on a new adapter's retention rows against the adapter it would replace."""
    checked, regressions, unchecked = [], [], []
    for r in rows:
        job = r.get("dataset_job")
        if not isinstance(job, int) or job == own_job:
            continue
        name, new, ref = r.get("dataset"), r.get("loss"), reference.get(job)
        if new is None or ref is None:
            why = r.get("skipped") or ("no loss" if new is None else
                                       "current_model/ has no recorded loss for it")
            unchecked.append({"dataset_job": job, "dataset": name, "why": why})
            continue
        rel = (new - ref) / max(ref, 1e-6)        # finite: it goes into JSON files
        item = {"dataset_job": job, "dataset": name, "reference_loss": ref, "loss": new,
                "relative_change": rel}
        checked.append(item)
        if rel > max_regression:
            regressions.append(item)
    regressions.sort(key=lambda i: -i["relative_change"])
    return {"held": bool(regressions), "max_retention_regression": max_regression,
            "reference": "current_model/", "checked": checked, "regressions": regressions,
            "unchecked": unchecked}


def _pct(rel: float) -> str:
    if not math.isfinite(rel):
        return "∞ %"
    return f"{100 * rel:.0f} %" if abs(rel) >= 0.1 else f"{100 * rel:.1f} %"


def describe(verdict: dict[str, Any]) -> str:
    """``held: forgot add.jsonl by 7 %`` (worst first), or why the gate passed."""
    if verdict.get("error"):
        return f"held: {verdict['error']}"
    regs = verdict.get("regressions") or []
    if regs:
        parts = [f"{r.get('dataset') or '#' + str(r['dataset_job'])} by {_pct(r['relative_change'])}"
                 for r in regs[:3]]
        more = f" and {len(regs) - 3} more" if len(regs) > 3 else ""
        return "held: forgot " + ", ".join(parts) + more
    worst = max((c["relative_change"] for c in verdict.get("checked") or []), default=None)
    limit = _pct(float(verdict.get("max_retention_regression") or 0))
    unchecked = len(verdict.get("unchecked") or [])
    more = f"; {unchecked} dataset(s) unchecked" if unchecked else ""
    if worst is None:
        return f"passed: no earlier dataset to compare (limit {limit}{more})"
    return f"passed: worst change {'+' if worst > 0 else ''}{_pct(worst)} (limit {limit}{more})"


# ============================================================================ the move

class PromotionError(RuntimeError):
    """promote / rollback refused; the message says why (nothing was moved)."""


def journal_path(home: Path) -> Path:
    return Layout(Path(home)).status_dir / JOURNAL_NAME


def _rel(home: Path, path: Path) -> str:
    try:
        return str(Path(path).relative_to(Path(home)))
    except ValueError:
        return str(path)


def _unique(parent: Path, name: str) -> Path:
    cand, n = parent / name, 2
    while cand.exists():
        cand, n = parent / f"{name}-{n}", n + 1
    return cand


def _stage_files(snapshot: Path, switched: dict[str, Any]) -> Callable[[Path], None]:
    """The snapshot's files (not its snapshot.json nor manifest); trainer_state.json says how
    it came back (``switched``)."""
    def write(d: Path) -> None:
        for p in sorted(snapshot.iterdir()):
            if p.is_file() and p.name not in (MANIFEST, SNAPSHOT_META, TRAINER_STATE):
                shutil.copy2(p, d / p.name)
        state = read_json(snapshot / TRAINER_STATE, {}) or {}
        (d / TRAINER_STATE).write_text(json.dumps({**state, "switched": switched}, indent=2, sort_keys=True,
                                                  default=str) + "\n", encoding="utf-8")
    return write


def switch_current(home: Path, snapshot: Path, action: str, *, _crash_at: str | None = None) -> dict[str, Any]:
    """Make *snapshot* current_model/ (steps in the module doc). The caller has checked it and
    holds the daemon lock. ``_crash_at`` (one of CRASH_POINTS) stops half way: tests only."""
    assert action in ACTIONS
    home = Path(home)
    layout = Layout(home)
    cur, staged = layout.current_model, home / STAGED_NAME
    had_current = cur.is_dir()
    backup = _unique(layout.snapshots, f"{datetime.now().strftime('%Y%m%d_%H%M%S')}__pre-{action}")
    at = now_iso()
    journal = {"action": action, "snapshot": _rel(home, snapshot), "staged": STAGED_NAME,
               "backup": _rel(home, backup) if had_current else None, "had_current": had_current,
               "started_at": at, "pid": os.getpid()}
    layout.status_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(journal_path(home), journal)                                      # 1
    if _crash_at == "journal":
        return journal
    fill_dir(staged, _stage_files(snapshot, {"action": action, "snapshot": journal["snapshot"],
                                             "previous": journal["backup"], "at": at}))  # 2
    fsync_dir(home)
    if _crash_at == "staged":
        return journal
    if had_current:
        durable_rename(cur, backup)                                                     # 3
    if _crash_at == "backup":
        return journal
    durable_rename(staged, cur)                                                         # 4: commit
    if _crash_at == "current":
        return journal
    return _finish(home, journal, recovered=False)


def _finish(home: Path, journal: dict[str, Any], *, recovered: bool) -> dict[str, Any]:
    """Step 5: the backup's snapshot.json, the event, the journal removed."""
    layout = Layout(Path(home))
    state = read_json(layout.current_model / TRAINER_STATE, {}) or {}
    backup = resolve_under(home, journal.get("backup"))
    if backup is not None and backup.is_dir() and not (backup / SNAPSHOT_META).is_file():
        old = read_json(backup / TRAINER_STATE, {}) or {}
        atomic_write_json(backup / SNAPSHOT_META, {
            "kind": f"pre-{journal['action']}", "replaced_by": journal.get("snapshot"),
            "base_model": old.get("base_model"), "base_fingerprint": old.get("base_fingerprint"),
            "datasets": dataset_entries(old), "total_steps": old.get("total_steps"),
            "created_at": journal.get("started_at") or now_iso()})
    names = [d.get("name") for d in dataset_entries(state)]
    move = {"action": journal["action"], "snapshot": journal.get("snapshot"), "previous": journal.get("backup"),
            "datasets": names, "at": journal.get("started_at"), "recovered": recovered}
    verb = "promoted" if journal["action"] == "promote" else "rolled back to"
    add_event(home, EVENT_KIND[journal["action"]],
              f"{verb} {journal.get('snapshot')}: current_model/ now holds {len(names)} dataset(s)"
              f"{' (' + ', '.join(str(n) for n in names[-3:]) + ')' if names else ''}; the previous adapter "
              f"is {journal.get('backup') or 'none'}" + (" (finished after an interruption)" if recovered else ""),
              data=move, level="warning" if recovered else "info")
    jpath = journal_path(home)
    jpath.unlink(missing_ok=True)
    fsync_dir(jpath.parent)
    return move


def recover_promotion(home: Path) -> str | None:
    """Finish or undo an interrupted promote/rollback; what was done, or None if nothing was.
    The caller holds the daemon lock (the daemon at start, or trainer-ctl promote/rollback)."""
    home = Path(home)
    layout = Layout(home)
    jpath, cur, staged = journal_path(home), layout.current_model, home / STAGED_NAME
    journal = read_json(jpath) if jpath.exists() else None
    if jpath.exists() and not (isinstance(journal, dict) and journal.get("action") in ACTIONS):
        log.error("unreadable promotion journal %s: left in place for a human", jpath)
        return None
    if journal is None:
        if staged.exists():            # no journal, no switch under way: a stray leftover
            shutil.rmtree(staged, ignore_errors=True)
            return "removed a stray current_model.switch/"
        return None
    backup = resolve_under(home, journal.get("backup"))
    backed_up = backup is not None and backup.is_dir()
    if cur.is_dir() and not staged.exists() and (backed_up or not journal.get("had_current")):
        what = "rolled_forward"                                 # crash after step 4
    elif not cur.exists() and staged.is_dir() and is_complete(staged):
        durable_rename(staged, cur)                             # crash between 3 and 4
        what = "rolled_forward"
    else:                                                       # before 3 (or 2 incomplete)
        if not cur.exists() and backed_up:
            durable_rename(backup, cur)                         # type: ignore[arg-type]
        shutil.rmtree(staged, ignore_errors=True)
        fsync_dir(home)
        what = "rolled_back"
    if what == "rolled_forward":
        _finish(home, journal, recovered=True)
    else:
        jpath.unlink(missing_ok=True)
        fsync_dir(jpath.parent)
        add_event(home, "promotion_recovered", f"interrupted {journal['action']} of {journal.get('snapshot')} "
                  "rolled back: current_model/ is the adapter it was before", data=journal, level="warning")
    log.warning("promotion recovery: %s %s of %s", what, journal["action"], journal.get("snapshot"))
    return f"{what} ({journal['action']} {journal.get('snapshot')})"


def moves(home: Path, limit: int = 100) -> list[dict[str, Any]]:
    """The recorded promote / rollback moves (state.db events), oldest first: for the lineage."""
    from core.statedb import StateDB

    path = Layout(Path(home)).state_db
    if not path.exists():
        return []
    db = StateDB(path, readonly=True)
    try:
        rows = db.conn.execute("SELECT ts, kind, message, data FROM events WHERE kind IN (?, ?) "
                               "ORDER BY id DESC LIMIT ?", (*EVENT_KIND.values(), limit)).fetchall()
    except Exception as exc:  # noqa: BLE001 - the lineage shows what it can
        log.warning("could not read the promote/rollback events: %s", exc)
        return []
    finally:
        db.close()
    out = []
    for ts, kind, message, data in reversed(rows):
        try:
            move = json.loads(data) if data else {}
        except ValueError:
            move = {}
        out.append({**(move if isinstance(move, dict) else {}), "kind": kind, "message": message,
                    "ts": datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")})
    return out
