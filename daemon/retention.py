"""Bounded growth: leftovers of killed runs removed at start-up, retention after each job.

``startup_cleanup`` (once, at daemon start, after the queue is reconciled; no worker runs then:
a worker dies with its daemon, PR_SET_PDEATHSIG) removes only what is clearly a leftover:

- ``status/jobs/job-N-*.json``: the JobSpec of an attempt whose daemon was killed (a live attempt
  removes its own when it ends), and the same files a release before this one wrote to
  ``$TMPDIR`` (only those naming this base dir as their ``home``: ours, since we hold its lock);
- ``checkpoints/[set-aside/]job-*/.tmp-step-*``: checkpoints a killed worker never finished;
- ``snapshots/.deleting-*``: a snapshot whose removal (below) was interrupted;
- ``snapshots/.tmp-NAME-PID`` and ``.copy-manual-PID-N``: a snapshot copy whose writer (a worker,
  or ``trainer-ctl snapshot``) was killed; only when process PID no longer exists.

``after_job`` (after each job ends, so its worker is gone) removes the ended attempt's
``.tmp-step-*`` and dead snapshot copies again and applies the retention settings:

- ``keep_snapshots``: snapshots/ keeps its newest ``keep_snapshots`` snapshot folders (by
  ``snapshot.json`` ``created_at``, else the folder's mtime) and, whatever their age, every
  snapshot a consolidation made or names (``kind`` "pre-consolidation", a ``consolidated_into``
  key, a path in a ``consolidated_models/*/consolidation.json``, the backup of a consolidation in
  progress), every ``kind`` "manual" one (``trainer-ctl snapshot``: asked for by hand), and any
  folder without a readable ``snapshot.json`` (not ours to judge). Adapters the promotion gate
  held back (``kind`` "held") are counted apart: the newest ``keep_snapshots`` of them stay, and
  they never push a published adapter out. A removal renames the folder to ``.deleting-NAME`` first (one rename), so a crash never leaves half a snapshot that looks
  whole.
- ``keep_events``: the events table keeps its newest ``keep_events`` rows, the probes table
  (probe answers, core/probetable.py) too.
- ``keep_set_aside``: ``checkpoints/set-aside/`` keeps the checkpoints of the ``keep_set_aside``
  jobs set aside last (a skipped or failed job's, kept so a retry resumes); older ones go (such
  a retry then starts the job from the beginning).

- token caches: ``cache/tokens/`` keeps the tokenized copies of files that a pending, active or
  failed job holds (at start-up and after each job), complete or half-built.

metrics.jsonl is rotated by its single writer (daemon/status.py, ``metrics_max_mb``,
``metrics_keep_files``), not here.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from core import probetable
from core.artifacts import BACKUP_SUFFIX, CONSOLIDATION_META, SNAPSHOT_META
from core.paths import Layout, resolve_under
from core.promotion import HELD_KIND
from core.states import JobState

if TYPE_CHECKING:
    from core.config import Config
    from core.statedb import StateDB

log = logging.getLogger("trainerd.retention")

PROTECTED_KINDS = ("pre-consolidation", "manual")
DELETING_PREFIX = ".deleting-"
# tempfile.mkstemp(prefix="job-N-", suffix=".json"): 8 random characters in between
JOB_SPEC_RE = re.compile(r"job-[0-9]+-[A-Za-z0-9_]{6,16}\.json")
# trainer/adapter_store.py write_snapshot, ops/snapshot.py snapshot_now: the writer's pid
SNAPSHOT_COPY_RES = (re.compile(r"\.tmp-.+-([0-9]+)"), re.compile(r"\.copy-manual-([0-9]+)-[0-9]+"))


def _rel(layout: Layout, path: Path) -> str:
    try:
        return str(path.relative_to(layout.home))
    except ValueError:
        return str(path)


def _guarded(what: str, step: Callable[[], list[str]]) -> list[str]:
    """Housekeeping never stops the daemon: a failing step is logged and the others go on."""
    try:
        return step()
    except Exception as exc:  # noqa: BLE001
        log.warning("%s failed: %r", what, exc)
        return [f"{what} failed: {exc}"]


# ---- leftovers ------------------------------------------------------------------------------------
def _remove_job_specs(layout: Layout) -> list[str]:
    out: list[str] = []
    d = layout.job_specs
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if p.is_file() and not p.is_symlink() and JOB_SPEC_RE.fullmatch(p.name):
                p.unlink(missing_ok=True)
                out.append(f"removed stale job spec {_rel(layout, p)}")
    return out


def _remove_legacy_tmp_specs(layout: Layout) -> list[str]:
    """Job specs an earlier release left in $TMPDIR, for this base dir only."""
    out: list[str] = []
    tmp = Path(tempfile.gettempdir())
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return out
    home = str(layout.home)
    for e in entries:
        if not JOB_SPEC_RE.fullmatch(e.name) or not e.is_file(follow_symlinks=False):
            continue
        try:
            if e.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            with open(e.path, encoding="utf-8") as fh:
                spec = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(spec, dict) and spec.get("home") == home and "job_id" in spec:
            Path(e.path).unlink(missing_ok=True)
            out.append(f"removed stale job spec {e.path}")
    return out


def _tmp_steps(layout: Layout) -> Iterator[Path]:
    ck = layout.checkpoints
    for pattern in ("job-*/.tmp-step-*", "set-aside/job-*/.tmp-step-*"):
        yield from ck.glob(pattern)


def remove_tmp_steps(layout: Layout) -> list[str]:
    """Half-written checkpoints: only while no worker runs (at start-up, after a job)."""
    out: list[str] = []
    for p in sorted(_tmp_steps(layout)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        out.append(f"removed unfinished checkpoint {_rel(layout, p)}")
    return out


def _remove_deleting(layout: Layout) -> list[str]:
    out: list[str] = []
    for root in (layout.snapshots, layout.checkpoints / "set-aside"):
        if root.is_dir():
            for p in sorted(root.glob(DELETING_PREFIX + "*")):
                shutil.rmtree(p, ignore_errors=True)
                out.append(f"finished removing {_rel(layout, p)}")
    return out


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True                      # not a pid we can judge: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                      # EPERM: someone else's live process
        return True
    return True


def remove_dead_snapshot_copies(layout: Layout) -> list[str]:
    """Snapshot copies whose writer no longer runs (a live ``trainer-ctl snapshot`` is left alone)."""
    out: list[str] = []
    if not layout.snapshots.is_dir():
        return out
    for p in sorted(layout.snapshots.iterdir()):
        m = next((m for r in SNAPSHOT_COPY_RES if (m := r.fullmatch(p.name))), None)
        if m is None or p.is_symlink() or not p.is_dir() or _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        out.append(f"removed unfinished snapshot copy {_rel(layout, p)}")
    return out


def startup_cleanup(layout: Layout, db: "StateDB | None" = None, cfg: "Config | None" = None) -> list[str]:
    """Remove what a killed daemon or worker left behind (no worker runs at daemon start), and
    prune the events table (events accrue without jobs too: rejected files, pauses, restarts)."""
    out: list[str] = []
    out += _guarded("removing stale job specs", lambda: _remove_job_specs(layout))
    out += _guarded("removing stale job specs in $TMPDIR", lambda: _remove_legacy_tmp_specs(layout))
    out += _guarded("removing unfinished checkpoints", lambda: remove_tmp_steps(layout))
    out += _guarded("removing interrupted snapshot removals", lambda: _remove_deleting(layout))
    out += _guarded("removing unfinished snapshot copies", lambda: remove_dead_snapshot_copies(layout))
    if db is not None:
        out += _guarded("pruning token caches", lambda: prune_token_caches(layout, db))
    if db is not None and cfg is not None:
        out += _guarded("pruning events", lambda: prune_events(db, cfg.keep_events))
    return out


# ---- snapshots ------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _named_snapshots(layout: Layout, meta: Any) -> set[str]:
    """Folder names in snapshots/ that the paths inside a JSON document point at."""
    snaps = layout.snapshots.resolve()
    out: set[str] = set()
    for s in _strings(meta):
        if "snapshots" not in s:
            continue
        try:
            p = resolve_under(layout.home, s).resolve()  # type: ignore[union-attr]
        except (OSError, ValueError, RuntimeError):
            continue
        if p.parent == snaps:
            out.add(p.name)
    return out


def consolidation_snapshots(layout: Layout) -> set[str]:
    """Snapshot names a consolidation names: in its consolidation.json, or its running journal."""
    names: set[str] = set()
    if layout.consolidated.is_dir():
        for d in layout.consolidated.iterdir():
            if not d.name.startswith(".") and d.is_dir():
                names |= _named_snapshots(layout, _read_json(d / CONSOLIDATION_META))
    names |= _named_snapshots(layout, _read_json(layout.status_dir / CONSOLIDATION_META))
    return names


def _created(path: Path, meta: Any) -> float:
    raw = meta.get("created_at") if isinstance(meta, dict) else None
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(raw).timestamp()
        except ValueError:
            pass
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _protected(name: str, meta: Any, named: set[str]) -> bool:
    if not isinstance(meta, dict):
        return True                       # no readable snapshot.json: not ours to judge
    if name in named or re.search(re.escape(BACKUP_SUFFIX) + r"(-[0-9]+)?$", name):
        return True
    return meta.get("kind") in PROTECTED_KINDS or "consolidated_into" in meta


def prune_snapshots(layout: Layout, keep: int) -> list[str]:
    """Remove snapshots beyond the newest *keep*, except protected ones (see the module doc)."""
    if not layout.snapshots.is_dir():
        return []
    found = []
    for d in layout.snapshots.iterdir():
        if d.name.startswith(".") or d.is_symlink() or not d.is_dir():
            continue
        meta = _read_json(d / SNAPSHOT_META)
        found.append((_created(d, meta), d.name, d, meta))
    if len(found) <= keep:
        return []
    found.sort(key=lambda t: (t[0], t[1]))
    named = consolidation_snapshots(layout)
    out: list[str] = []
    # candidates the promotion gate held back are counted apart: they never push a published
    # adapter out, and the newest *keep* of them wait for `trainer-ctl promote`
    held = [t for t in found if isinstance(t[3], dict) and t[3].get("kind") == HELD_KIND]
    for group, what in (([t for t in found if t not in held], ""), (held, " held")):
        for _, name, d, meta in group[: max(0, len(group) - keep)]:     # the newest *keep* always stay
            if _protected(name, meta, named):
                continue
            if _remove_whole(d):
                out.append(f"removed{what} snapshot {_rel(layout, d)} (keep_snapshots {keep})")
    return out


def _remove_whole(d: Path) -> bool:
    """Rename *d* to ``.deleting-NAME`` (one rename: never half a folder that looks whole), then
    delete it; a crash in between is finished at the next start (``_remove_deleting``)."""
    aside = d.with_name(DELETING_PREFIX + d.name)
    try:
        os.rename(d, aside)
    except OSError as exc:
        log.warning("could not remove %s: %s", d, exc)
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


# ---- events ---------------------------------------------------------------------------------------
def prune_events(db: "StateDB", keep: int) -> list[str]:
    """Delete the oldest events beyond the newest *keep* (one short transaction)."""
    row = db.conn.execute("SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (keep,)).fetchone()
    if row is None:
        return []
    try:
        with db.tx() as c:
            n = c.execute("DELETE FROM events WHERE id <= ?", (row[0],)).rowcount
    except sqlite3.Error as exc:          # a full disk, a busy database: next time
        log.warning("could not prune events: %s", exc)
        return []
    return [f"removed {n} oldest event(s) (keep_events {keep})"]


def prune_probes(db: "StateDB", keep: int) -> list[str]:
    """The probes table keeps its newest *keep* answers (keep_events), like the events."""
    n = probetable.prune(db, keep)
    return [f"removed {n} oldest probe answer(s) (keep_events {keep})"] if n else []


def prune_set_aside(layout: Layout, keep: int) -> list[str]:
    """Remove the set-aside checkpoints of all but the *keep* jobs set aside last."""
    root = layout.checkpoints / "set-aside"
    if not root.is_dir():
        return []
    found = sorted((d.stat().st_mtime, d.name, d) for d in root.glob("job-*")
                   if d.is_dir() and not d.is_symlink())
    out: list[str] = []
    for _, _name, d in found[: max(0, len(found) - keep)]:
        if _remove_whole(d):
            out.append(f"removed set-aside checkpoints {_rel(layout, d)} (keep_set_aside {keep})")
    return out


def prune_token_caches(layout: Layout, db: "StateDB") -> list[str]:
    """Remove the tokenized copies (``cache/tokens/``, trainer/tokencache.py) of files no pending,
    active or failed job holds (a done file is not read again; a failed one may be retried), and
    builds a killed worker left half-way."""
    root = layout.token_cache
    if not root.is_dir():
        return []
    live = {(j.sha256 or "")[:16] for state in (JobState.PENDING, JobState.PROCESSING, JobState.FAILED)
            for j in db.jobs(state)}
    out: list[str] = []
    for d in sorted(root.iterdir()):
        if d.is_symlink() or not d.is_dir():
            continue
        if d.name.startswith(DELETING_PREFIX):     # a removal a crash interrupted
            shutil.rmtree(d, ignore_errors=True)
            continue
        name = d.name.removeprefix(".partial-")          # a build a stopped worker left to continue
        stale = name.split("-", 1)[0] not in live
        if stale and _remove_whole(d):
            out.append(f"removed token cache {_rel(layout, d)}")
    return out


def after_job(layout: Layout, db: "StateDB", cfg: "Config") -> list[str]:
    """Apply the retention settings; returns what was removed or rotated."""
    out: list[str] = []
    out += _guarded("removing unfinished checkpoints", lambda: remove_tmp_steps(layout))
    out += _guarded("removing unfinished snapshot copies", lambda: remove_dead_snapshot_copies(layout))
    out += _guarded("pruning snapshots", lambda: prune_snapshots(layout, cfg.keep_snapshots))
    out += _guarded("pruning events", lambda: prune_events(db, cfg.keep_events))
    out += _guarded("pruning probe answers", lambda: prune_probes(db, cfg.keep_events))
    out += _guarded("pruning set-aside checkpoints", lambda: prune_set_aside(layout, cfg.keep_set_aside))
    out += _guarded("pruning token caches", lambda: prune_token_caches(layout, db))
    return out
