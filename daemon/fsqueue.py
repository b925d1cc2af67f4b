"""The job queue: one folder per state, one ``os.rename`` per transition (like Maildir).

The folder a file sits in is the truth for where it is; state.db records everything else.
Each transition is the row change and the rename in one transaction (``StateDB.commit_with``):
a failed write (a full disk) leaves both as they were, and a crash between the rename and the
commit leaves a file whose row is stale or missing, which ``reconcile`` repairs at start-up. Nothing here deletes a
user's file: bad input goes to ``failed/`` with ``NAME.error.json`` beside it.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable

from core.atomic import atomic_write_json, fsync_dir, sha256_file
from core.config import Config, ConfigError, load_config
from core.paths import Layout
from core.statedb import Counts, Job, StateDB, counter_key
from core.states import FOLDER_STATES, JobState, Priority, check_transition
from core.validation import validate_file
from daemon.intakefile import (Checked, FileChanged, Intake, check_file, ident, is_ignored,
                               printable, safe_name)
from daemon.status import iso

log = logging.getLogger("trainerd.queue")


def _fsync_dirs(src: Path, dst: Path) -> None:
    """Make a committed rename durable; a failure here is logged (reconcile repairs a lost one)."""
    for d in {src.parent, dst.parent}:
        try:
            fsync_dir(d)
        except OSError as exc:
            log.error("fsync of %s failed after a committed move: %s", d, exc)

ERROR_SUFFIX = ".error.json"
FINISHED = "trainer_jobs_finished"       # state.db counter: jobs that ended, by outcome


class QueueError(RuntimeError):
    """A queue operation the user asked for cannot be done (unknown name, wrong state...)."""


class FsQueue:
    def __init__(self, layout: Layout, db: StateDB, *, max_bad_record_fraction: float | None = None) -> None:
        self.layout = layout
        self.db = db
        self.changes = 0        # bumped on every change of a job's state or priority
        # the validation threshold: the daemon sets it from its config; None reads config.json
        self.max_bad_record_fraction = max_bad_record_fraction

    def bad_record_fraction(self) -> float:
        """``max_bad_record_fraction`` as set, else config.json's (its default if it is invalid)."""
        if self.max_bad_record_fraction is not None:
            return self.max_bad_record_fraction
        try:
            return load_config(self.layout.config).max_bad_record_fraction
        except ConfigError:
            return Config.model_fields["max_bad_record_fraction"].default

    # ---- paths ------------------------------------------------------------------------
    def path(self, state: JobState | str, name: str) -> Path:
        return self.layout.state_dir(JobState(state)) / name

    def error_path(self, name: str) -> Path:
        return self.layout.state_dir(JobState.FAILED) / (name + ERROR_SUFFIX)

    @staticmethod
    def _unique(wanted: str, taken: Callable[[str], bool]) -> str:
        """safe_name(wanted), or NAME.2.jsonl, NAME.3.jsonl... until *taken* says no."""
        name = safe_name(wanted)
        stem, n = name[: -len(".jsonl")], 1
        while taken(name):
            n += 1
            name = f"{stem}.{n}.jsonl"
        return name

    def _unique_name(self, wanted: str) -> str:
        """A name no job and no queue folder has (names stay unique across the whole queue)."""
        return self._unique(wanted, lambda n: self.db.name_taken(n) or any(
            self.path(s, n).exists() or self.path(s, n).is_symlink() for s in FOLDER_STATES))

    def unique_inbox_name(self, wanted: str) -> str:
        return self._unique(wanted, lambda n: os.path.lexists(self.layout.inbox / n))

    def _write_error(self, name: str, reason: str, *, job_id: int | None = None,
                     extra: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.error_path(name), {
            "file": name, "reason": reason, "job_id": job_id, "at": iso(), **(extra or {})})

    # ---- intake -----------------------------------------------------------------------
    def accept(self, src: Path, intake: Intake | None = None, *, checked: Checked | None = None) -> Job:
        """Take a complete file (from inbox/ or a staged copy) into pending/ or failed/.

        ``checked``: :func:`check_file`'s result for *src*, made beforehand (off the daemon's
        loop); FileChanged when the file is no longer the one checked. Without it the file is
        checked here.
        """
        intake = intake or Intake()
        original = printable(intake.original_name or src.name)
        name = self._unique_name(original)
        if checked is None:
            checked = check_file(src, max_bad_record_fraction=self.bad_record_fraction(), name=original)
        elif ident(os.lstat(src)) != checked.ident:
            raise FileChanged(f"{original} changed after it was checked; taken later")
        sha, size, reason, report = checked.sha256, checked.size, checked.reason, checked.report
        extra: dict[str, Any] = {"original_name": original}
        fmt = records = None
        duplicate_of = None
        if report is not None:
            extra["validation"] = {k: v for k, v in report.to_json().items() if k != "path"}
            fmt, records = report.format, report.valid_records
        if reason is None and not intake.force:
            assert sha is not None
            first = self.db.find_trained_or_queued(sha)
            if first is not None:
                duplicate_of = first.id
                reason = (f"duplicate: same content (sha256 {sha[:12]}…) as job {first.id} "
                          f"'{first.name}' ({first.state}); use `trainer-ctl queue retry "
                          f"{name} --force` to train it again")
                extra["duplicate_of"] = first.id
        extra["sha256"] = sha
        if reason is not None:
            self._write_error(name, reason, extra=extra)
            try:
                job = self._enter(src, name, dict(
                    name=name, original_name=original, state=JobState.FAILED, sha256=sha, size=size,
                    priority=intake.priority, forced=intake.force, duplicate_of=duplicate_of,
                    error=reason, fmt=fmt, records=records),
                    {counter_key(FINISHED, outcome="duplicate" if duplicate_of else "rejected"): 1.0})
            except BaseException:
                self.error_path(name).unlink(missing_ok=True)
                raise
            self.db.add_event("rejected", f"{original}: {reason}", level="warning", job_id=job.id)
            log.warning("rejected %s -> failed/%s: %s", original, name, reason)
            return job
        job = self._enter(src, name, dict(
            name=name, original_name=original, state=JobState.PENDING, sha256=sha, size=size,
            priority=intake.priority, forced=intake.force, fmt=fmt, records=records))
        skipped = ""
        if report is not None and report.bad_records:
            skipped = (f"; {report.bad_records} bad record{'s' if report.bad_records != 1 else ''} "
                       f"skipped: {report.summary}")
        self.db.add_event("accepted", f"{original} queued as {name} ({records} records, {fmt}, "
                          f"priority {intake.priority.value}{skipped})", job_id=job.id,
                          data={"validation": extra["validation"]} if skipped else None)
        log.info("accepted %s -> pending/%s (%s records, %s%s)", original, name, records, fmt, skipped)
        return job

    def _enter(self, src: Path, name: str, row: dict[str, Any], counts: Counts | None = None) -> Job:
        """Insert the row and rename the file into its folder: together, or neither."""
        dst = self.path(row["state"], name)

        def insert(c: Any) -> int:
            self.db.add_counts_in(c, counts or {})
            return self.db.insert_job_in(c, **row)
        job_id = self.db.commit_with(insert,
                                     effect=lambda: os.rename(src, dst), undo=lambda: os.rename(dst, src))
        _fsync_dirs(src, dst)
        self.changes += 1
        job = self.db.get(job_id)
        assert job is not None
        return job

    # ---- transitions ------------------------------------------------------------------
    def move(self, job: Job, dst: JobState, *, error: str | None = None,
             error_extra: dict[str, Any] | None = None, outcome: str | None = None, **fields: Any) -> Job:
        """Move a job between folders: the row and the rename together. A move into done/ or
        failed/ counts as the end of a job in ``trainer_jobs_finished{outcome}`` (state.db's
        counters, in the same transaction): *outcome* names how it ended (default: the folder)."""
        src = JobState(job.state)
        check_transition(src, dst)
        ended = {counter_key(FINISHED, outcome=outcome or dst.value): 1.0} \
            if dst in (JobState.DONE, JobState.FAILED) else {}
        if dst is JobState.FAILED:
            self._write_error(job.name, error or "failed", job_id=job.id,
                              extra={"original_name": job.original_name, "sha256": job.sha256,
                                     **(error_extra or {})})
        a, b = self.path(src, job.name), self.path(dst, job.name)
        try:
            self.db.commit_with(
                lambda c: (self.db.update_in(c, job.id, state=dst,
                                             error=error if dst is JobState.FAILED else None, **fields),
                           self.db.add_counts_in(c, ended)),
                effect=lambda: os.rename(a, b), undo=lambda: os.rename(b, a))
        except BaseException:
            if dst is JobState.FAILED:
                self.error_path(job.name).unlink(missing_ok=True)
            raise
        _fsync_dirs(a, b)
        if src is JobState.FAILED:
            self.error_path(job.name).unlink(missing_ok=True)
        if dst is JobState.FAILED:
            self._move_checkpoints(job.id, aside=True)
        elif src is JobState.FAILED:
            self._move_checkpoints(job.id, aside=False)
        self.changes += 1
        new = self.db.get(job.id)
        assert new is not None
        return new

    def _move_checkpoints(self, job_id: int, *, aside: bool) -> None:
        """A job entering failed/ (skipped, removed, failed) has its checkpoints set aside, so
        they never count as a job "mid-way" (consolidation, preset switch); a retry puts them
        back, and the trainer resumes from them if they still fit the current adapter."""
        live, parked = self.layout.job_checkpoints(job_id), self.layout.set_aside_checkpoints(job_id)
        src, dst = (live, parked) if aside else (parked, live)
        if not src.is_dir():
            return
        try:
            if dst.exists():                  # an older copy: the newer one wins
                shutil.rmtree(dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            if aside:
                os.utime(dst)                 # when it was set aside: keep_set_aside keeps the newest
            _fsync_dirs(src, dst)
            log.info("job %d: checkpoints %s %s", job_id, "set aside in" if aside else "restored to", dst)
        except OSError as exc:     # the move is done; only the checkpoints stay where they were
            log.error("job %d: could not move checkpoints %s -> %s: %s", job_id, src, dst, exc)

    def claim_next(self) -> Job | None:
        """Move the head of pending/ into processing/ and return it (None if empty)."""
        job = self.db.next_pending()
        if job is None:
            return None
        try:
            return self.move(job, JobState.PROCESSING, attempts=job.attempts + 1, started_at=time.time())
        except FileNotFoundError:       # removed by hand behind our back: record it, go on
            msg = f"{job.name}: file vanished from queue/pending/ (not moved by trainerd)"
            self._mark_missing(job, msg)
            self.changes += 1
            self.db.add_event("missing", msg, level="error", job_id=job.id)
            log.error("%s", msg)
            return None

    def _mark_missing(self, job: Job, error: str) -> None:
        """Record that a job's file vanished from its folder (state.db only: no file to move)."""
        check_transition(JobState(job.state), JobState.MISSING)
        with self.db.tx() as c:
            self.db.update_in(c, job.id, state=JobState.MISSING.value, error=error)
            self.db.add_counts_in(c, {counter_key(FINISHED, outcome="missing"): 1.0})

    # ---- user operations ----------------------------------------------------------------
    def get(self, name: str) -> Job:
        """A job by its queue name, or by the name its file had when it arrived (the newest)."""
        job = self.db.by_name(name) or self.db.by_name(unicodedata.normalize("NFC", name)) \
            or self.db.by_original_name(name)
        if job is None:
            raise QueueError(f"no job named '{name}' (see `trainer-ctl queue list`)")
        return job

    def remove(self, name: str) -> Job:
        job = self.get(name)
        name = job.name
        if job.state != JobState.PENDING.value:
            raise QueueError(f"'{name}' is {job.state}; only pending jobs can be removed")
        job = self.move(job, JobState.FAILED, error="removed by user", outcome="removed")
        self.db.add_event("removed", f"{name} removed from the queue (kept in failed/)", job_id=job.id)
        return job

    def retry(self, name: str, *, force: bool = False) -> Job:
        job = self.get(name)
        name = job.name
        if job.state != JobState.FAILED.value:
            raise QueueError(f"'{name}' is {job.state}; only failed jobs can be retried")
        path = self.path(JobState.FAILED, name)
        if path.is_symlink() or not path.is_file():
            raise QueueError(f"'{name}' is not a regular file; it cannot be trained")
        sha = sha256_file(path)
        report = validate_file(path, max_bad_record_fraction=self.bad_record_fraction())
        if not report.ok:
            raise QueueError(f"'{name}' is still invalid: {report.reason}")
        if not force:
            first = self.db.find_trained_or_queued(sha)
            if first is not None and first.id != job.id:
                raise QueueError(f"'{name}' has the same content as job {first.id} '{first.name}' "
                                 f"({first.state}); add --force to train it again")
        job = self.move(job, JobState.PENDING, attempts=0, crashes=0, not_before=None,
                        forced=force or job.forced, duplicate_of=None, sha256=sha, seq=self.db.next_seq(),
                        format=report.format, records=report.valid_records)
        self.db.add_event("retried", f"{name} moved back to pending", job_id=job.id)
        return job

    def prioritize(self, name: str, level: Priority) -> Job:
        job = self.get(name)
        if job.state != JobState.PENDING.value:
            raise QueueError(f"'{name}' is {job.state}; only pending jobs can be re-prioritized")
        self.db.update(job.id, priority=level, seq=self.db.next_seq())   # joins the back of that level
        self.changes += 1
        self.db.add_event("prioritized", f"{name} priority set to {level.value}", job_id=job.id)
        return self.get(name)

    # ---- start-up reconciliation ----------------------------------------------------------
    def reconcile(self, *, dry_run: bool = False) -> list[str]:
        """Make state.db agree with the folders; requeue interrupted jobs. Returns the fixes.

        A job found in processing/ was interrupted by a daemon restart (a stop, a crash, a
        SIGKILL): it goes back to the head of the queue and resumes from its checkpoint. A restart
        is not a failure of the job, so it never counts towards ``max_attempts``.

        With ``dry_run`` nothing is changed: the list says what would be fixed (``trainer-ctl check``).
        """
        fixes: list[str] = []
        seen: set[str] = set()
        rows = {j.name: j for j in self.db.jobs()}      # one query, not one per file
        for state in FOLDER_STATES:
            folder = self.layout.state_dir(state)
            for entry in sorted(folder.iterdir(), key=lambda p: p.name):
                name = entry.name
                if is_ignored(name) or name.endswith(ERROR_SUFFIX):
                    continue
                seen.add(name)
                job = rows.get(name)
                if job is None:
                    fixes.append(f"adopted {state.value}/{name} (no record in state.db)")
                    if dry_run:
                        if state is JobState.PROCESSING:
                            fixes.append(f"{name}: interrupted in processing/, back to the head of pending/")
                        continue
                    regular = entry.is_file() and not entry.is_symlink()
                    job = self.db.insert_job(
                        name=name, original_name=name, state=state,
                        sha256=sha256_file(entry) if regular else None, size=entry.lstat().st_size,
                        error="adopted at start-up" if state is JobState.FAILED else None)
                    if state is JobState.FAILED and not self.error_path(name).exists():
                        self._write_error(name, "found in failed/ with no record", job_id=job.id)
                elif job.state != state.value:
                    fixes.append(f"{name}: state.db said {job.state}, file is in {state.value}/")
                    if not dry_run:
                        self.db.update(job.id, state=state)
                        job = self.db.get(job.id)
                        assert job is not None
                if state is JobState.PROCESSING:
                    fixes.append(f"{name}: interrupted in processing/, back to the head of pending/")
                    if not dry_run:
                        self.move(job, JobState.PENDING, resume=True)
        for job in self.db.jobs(JobState.FAILED) if not dry_run else []:
            if self.layout.job_checkpoints(job.id).is_dir():
                fixes.append(f"{job.name}: failed, its checkpoints set aside")
                self._move_checkpoints(job.id, aside=True)
        for job in rows.values():
            if job.name not in seen and job.state in {s.value for s in FOLDER_STATES}:
                fixes.append(f"{job.name}: recorded as {job.state} but not found in any queue folder")
                if not dry_run:
                    self._mark_missing(job, f"file vanished from queue/{job.state}/ (not moved by trainerd)")
        if not dry_run:
            self.changes += 1
            for fix in fixes:
                log.warning("reconcile: %s", fix)
                self.db.add_event("reconciled", fix, level="warning")
        return fixes
