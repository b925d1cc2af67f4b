"""Every queue operation, written once: what the daemon, trainer-ctl and the monitor call.

``apply(queue, command, args)`` changes the queue (add a staged file, remove, retry,
prioritize, switch preset) and says what it did. The daemon calls it from its loop for each
control request; ``submit(layout, command, args)`` is the way in for everyone else: through the
running daemon (a control request and its reply), or, when no daemon runs, ``apply`` on a queue
opened under the daemon lock, so there is never more than one writer of the queue.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from core.atomic import durable_rename
from core.diskfull import describe as describe_disk, is_disk_full
from core.lock import AlreadyRunning, DaemonLock, daemon_running
from core.paths import Layout
from core.statedb import StateDB
from core.states import JobState, Priority
from daemon import control as ctl
from core.statedb import Job
from daemon.fsqueue import FsQueue, QueueError
from daemon.intakefile import Intake

QUEUE_OPS = ("queue_add", "queue_remove", "queue_retry", "queue_prioritize", "preset_switch")
LOCK_WAIT_S = 60.0          # another trainer-ctl holding the lock for a short operation


@dataclass(frozen=True)
class Reply:
    """What became of a submitted operation. ``how``: "daemon" (applied by the running daemon),
    "direct" (applied here under the daemon lock), "timeout" (the daemon did not answer; the
    request stays in control/), "busy" (the lock stayed held by another operation)."""
    ok: bool
    message: str
    how: str
    data: dict[str, Any] = field(default_factory=dict)


def describe(job: Job) -> str:
    if job.state == JobState.PENDING.value:
        return f"queued {job.original_name} as {job.name} (job {job.id}, priority {job.priority})"
    return f"rejected {job.original_name}: {job.error} (kept as queue/failed/{job.name})"


def _add(queue: FsQueue, args: dict[str, Any]) -> tuple[bool, str]:
    staged = str(args.get("staged", ""))
    if "/" in staged or not staged.startswith(".") or not staged.endswith(".part"):
        return False, "bad staged file name"
    src = queue.layout.inbox / staged
    if not src.exists():
        return False, f"staged file {staged} not found in inbox/"
    name = str(args.get("name") or "dataset.jsonl")
    try:
        job = queue.accept(src, Intake(priority=Priority(args.get("priority", "normal")),
                                       force=bool(args.get("force")), original_name=name))
    except Exception:
        # keep the (possibly only) copy: make it an ordinary inbox file, taken later
        if src.exists():
            durable_rename(src, queue.layout.inbox / queue.unique_inbox_name(name))
        raise
    return job.state == JobState.PENDING.value, describe(job)


def apply(queue: FsQueue, command: str, args: dict[str, Any]) -> tuple[bool, str]:
    """Apply one queue operation; (ok, message). QueueError for a refusal the queue explains."""
    if command == "queue_add":
        return _add(queue, args)
    if command == "queue_remove":
        return True, f"removed {queue.remove(str(args['name'])).name} (moved to failed/)"
    if command == "queue_retry":
        job = queue.retry(str(args["name"]), force=bool(args.get("force")))
        return True, f"{job.name} moved back to pending"
    if command == "queue_prioritize":
        job = queue.prioritize(str(args["name"]), Priority(args["level"]))
        return True, f"{job.name} priority is now {job.priority}"
    if command == "preset_switch":
        from daemon.presets import PresetError, switch_preset
        try:
            return True, switch_preset(queue.layout, str(args.get("name")))
        except PresetError as exc:
            return False, str(exc)
    return False, f"unknown queue operation {command}"


def _lock_unless_daemon(layout: Layout, wait_s: float) -> DaemonLock | None:
    """The daemon lock if no daemon runs (waiting out another operation holding it), else None."""
    deadline = time.monotonic() + wait_s
    while not daemon_running(layout):
        try:
            return DaemonLock(layout).acquire(wait_s=0.5)
        except AlreadyRunning:
            if time.monotonic() > deadline:
                raise
    return None


def _direct(layout: Layout, command: str, args: dict[str, Any]) -> Reply:
    layout.ensure()
    db = StateDB(layout.state_db)
    try:
        queue = FsQueue(layout, db)
        queue.reconcile()        # what the daemon would do at start, so rows match files
        ok, message = apply(queue, command, args)
    except QueueError as exc:
        ok, message = False, str(exc)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        return Reply(False, f"{describe_disk(layout.home)}: {exc.strerror or exc}; nothing was changed"
                     + (" (the file waits in inbox/)" if command == "queue_add" else ""),
                     "direct", {"disk_full": True})
    finally:
        db.close()
    return Reply(ok, message, "direct")


def submit(layout: Layout, command: str, args: dict[str, Any], *, source: str,
           timeout: float = 15.0, lock_wait_s: float = LOCK_WAIT_S) -> Reply:
    """Apply a queue operation through the daemon if it runs, else directly under its lock."""
    if command not in QUEUE_OPS:
        raise ValueError(f"not a queue operation: {command}")
    while True:
        try:
            lock = _lock_unless_daemon(layout, lock_wait_s)
        except AlreadyRunning:
            return Reply(False, "the base dir stayed locked by another trainer-ctl operation for "
                                f"{lock_wait_s:.0f} s; try again", "busy")
        if lock is not None:
            try:
                return _direct(layout, command, args)
            finally:
                lock.release()
        a = ctl.round_trip(layout, command, args, source=source, timeout=timeout)
        if a.how == "down":
            continue                 # it stopped meanwhile: apply it ourselves
        return Reply(a.ok, a.message, a.how, a.data)

