"""trainerd: the supervisor loop.

One thread owns the queue, state.db and the status files. Watchdog and signal handlers only
set flags/wake the loop (huey's consumer); the trainer runs in a runner thread (and, for the
real trainer, a worker subprocess) and talks to the loop through two queues. ``run(burst=True)``
drains inbox and queue and returns (rq's burst worker), which makes tests deterministic.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import stat
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from core.atomic import atomic_write
from core.config import Config, ConfigError, config_to_dict, describe_locked_diffs, load_config, locked_diffs
from core.diskfull import MIB, Reserve, describe as describe_disk, free_bytes, is_disk_full
from core.interface import Command, JobResult, JobSpec, Outcome, QueueControl, Trainer
from core.lock import AlreadyRunning, DaemonLock, read_pid
from core.logsetup import setup_logging
from core.paths import Layout
from core.statedb import Job, StateDB
from core.states import DaemonStatus, JobState
from core.validation import ValidationCancelled
from daemon import control as ctl, queueops, retention
from daemon.autogen import AutoGenerator
from daemon.fsqueue import Checked, FileChanged, FsQueue, QueueError, printable
from daemon.intakecheck import IntakeCheck
from daemon.presets import recover_preset_switch
from daemon.status import StatusBoard, iso
from daemon.watcher import InboxTracker, Watcher

log = logging.getLogger("trainerd")

TICK_S = 0.2
MAX_BACKOFF_FACTOR = 64         # a crash-looping job waits retry_backoff_s x 1, 2, 4 ... 64 at most
INLINE_CHECK_BYTES = 1 << 20    # an inbox file up to this size is checked on the loop (some ms);
                                # a bigger one in an IntakeCheck child process


class QueueSink:
    def __init__(self, q: "queue.Queue[dict[str, Any]]", wake: threading.Event) -> None:
        self._q, self._wake = q, wake

    def emit(self, event: dict[str, Any]) -> None:
        self._q.put(event)
        self._wake.set()


class JobRunner(threading.Thread):
    def __init__(self, trainer: Trainer, spec: JobSpec, sink: QueueSink, wake: threading.Event) -> None:
        super().__init__(name=f"job-{spec.job_id}", daemon=True)
        self.trainer, self.spec, self.sink, self.wake = trainer, spec, sink, wake
        self.control = QueueControl()
        self.result: JobResult | None = None

    def run(self) -> None:
        try:
            self.result = self.trainer.run(self.spec, self.sink, self.control)
        except Exception as exc:  # a trainer bug must not take the daemon down
            if is_disk_full(exc):
                log.error("trainer could not write: %s", exc)
                self.result = JobResult(Outcome.FAILED, f"disk full: {exc}", details={"disk_full": True})
            else:
                log.exception("trainer raised")
                self.result = JobResult(Outcome.FAILED, f"trainer error: {exc!r}",
                                        details={"crash": True, "traceback": traceback.format_exc()})
        finally:
            self.wake.set()


def recover_interrupted_consolidation(layout: Layout) -> None:
    """Finish or undo a consolidation that a crash interrupted (its journal says which)."""
    if not (layout.status_dir / "consolidation.json").exists() and not any(layout.consolidated.glob(".tmp-*")):
        return          # the common case: no torch import at daemon start
    from core.switch import recover_consolidation
    what = recover_consolidation(layout.home)
    if what:
        log.warning("consolidation recovery: %s", what)


class Daemon:
    def __init__(self, layout: Layout, *, trainer_factory: Callable[[Config], Trainer] | None = None) -> None:
        layout.ensure()
        self.layout = layout
        recover_interrupted_consolidation(layout)         # before config and locked keys are read
        recover_preset_switch(layout)
        self.config = load_config(layout.config)          # ConfigError: refuse to start
        self._config_mtime = self._mtime(layout.config)
        self._config_error: str | None = None
        self._locked_msg: str | None = None
        self.db = StateDB(layout.state_db)
        self.queue = FsQueue(layout, self.db, max_bad_record_fraction=self.config.max_bad_record_fraction)
        self.board = StatusBoard(layout, interval=self.config.status_interval_s,
                                 metrics_max_mb=self.config.metrics_max_mb,
                                 metrics_keep_files=self.config.metrics_keep_files)
        self.check: IntakeCheck | None = None     # the inbox file being hashed and validated
        self.board.update(checking=None)
        self.wake = threading.Event()
        self.tracker = InboxTracker(layout.inbox, self.config.inbox_stable_seconds)
        self.events: "queue.Queue[dict[str, Any]]" = queue.Queue()
        if trainer_factory is None:
            from daemon.factory import make_trainer
            trainer_factory = make_trainer
        self.trainer_factory = trainer_factory
        # one trainer across jobs (its warm worker keeps the base loaded); closed at the stop
        self._trainer: Trainer | None = None
        self._trainer_key: tuple[Any, ...] | None = None
        self.autogen = AutoGenerator(layout.inbox)
        self.runner: JobRunner | None = None
        self.current: Job | None = None
        self.paused = False                       # by the user (trainer-ctl pause)
        self._disk_full: str | None = None        # "disk full (N MiB free in DIR)" while paused for it
        self._disk_check_at = 0.0
        self.reserve = Reserve(layout.status_dir)
        self._resumed_from = 0                    # the step the running attempt started from
        self._progress = False                    # the running attempt wrote a checkpoint past it
        self._stop_reason: str | None = None
        self._signal: int | None = None

    # ---- flags ---------------------------------------------------------------------------
    @staticmethod
    def _mtime(path: Path) -> int | None:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum          # handlers only set flags; the loop acts
        self.wake.set()

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is not None:
            return
        self._stop_reason = reason
        log.info("stopping: %s", reason)
        self.db.add_event("stopping", f"daemon stopping: {reason}")
        self.board.set_status(DaemonStatus.STOPPING)
        if self.runner is not None:
            self.runner.control.send(Command.STOP)

    def _check_flags(self) -> None:
        if self._signal is not None:
            name = signal.Signals(self._signal).name
            self._signal = None
            self.request_stop(f"received {name}")
        if self.layout.stop_flag.exists():
            log.warning("emergency stop: found %s; removing it and stopping", self.layout.stop_flag)
            self.layout.stop_flag.unlink(missing_ok=True)
            self.request_stop("emergency stop flag .stop")

    # ---- config ----------------------------------------------------------------------------
    def _report_error(self, msg: str, kind: str) -> None:
        """Log, record and show an error. Runs on error paths, so it never raises itself."""
        msg = printable(msg)
        log.error("%s", msg)
        try:
            self.db.add_event(kind, msg, level="error")
        except Exception:
            log.exception("could not record the error in state.db")
        self.board.update(last_error={"message": msg, "at": iso(), "kind": kind})

    def effective_config(self) -> Config:
        """config.json as validated, with locked keys held at their recorded values."""
        mtime = self._mtime(self.layout.config)
        if mtime != self._config_mtime:
            try:
                self.config = load_config(self.layout.config)
                self._config_mtime, self._config_error = mtime, None
                self.board.set_metrics_retention(self.config.metrics_max_mb, self.config.metrics_keep_files)
                log.info("config.json reloaded")
            except ConfigError as exc:
                if str(exc) != self._config_error:
                    self._config_error = str(exc)
                    self._report_error(f"{exc}\nkeeping the previous valid settings", "config_error")
        cfg = self.config
        ns = cfg.locked_namespace
        recorded = self.db.locked(ns)
        current = cfg.locked_values()
        fresh = {k: v for k, v in current.items() if k not in recorded and v is not None}
        if fresh:
            self.db.record_locked(fresh, ns)
        diffs = locked_diffs(recorded, cfg)
        if diffs:
            where = f" (preset {ns!r})" if ns else ""
            msg = (f"config.json changes locked key(s){where}: {describe_locked_diffs(diffs)}. "
                   "Refused: training keeps the recorded values. To accept the change run "
                   + " && ".join(f"`trainer-ctl config unlock {k}`" for k in diffs))
            if msg != self._locked_msg:
                self._locked_msg = msg
                self._report_error(msg, "locked_key")
            cfg = cfg.model_copy(update={k: recorded[k] for k in diffs})
        else:
            self._locked_msg = None
        return cfg

    # ---- control requests ------------------------------------------------------------------------
    def _handle_control(self) -> None:
        for path, req in ctl.pending_requests(self.layout):
            if req is None:
                ctl.set_aside(self.layout, path)
                continue
            age = time.time() - float(req.get("requested_at") or 0)
            data: dict[str, Any] = {}
            try:
                if age > ctl.MAX_AGE_S:
                    ok, message = False, f"expired: sent {age:.0f} s ago and not applied"
                else:
                    ok, message = self._apply(req["command"], req.get("args") or {})
            except QueueError as exc:
                ok, message = False, str(exc)
            except Exception as exc:
                if is_disk_full(exc):   # nothing half-done (atomic writes, transactions): pause, say so
                    self._enter_disk_full(f"{req['command']}: {type(exc).__name__}: {exc}")
                    ok, message = False, (f"{self._disk_full}: {getattr(exc, 'strerror', None) or exc}; "
                                          + ("the file waits in inbox/ and is queued when space is back"
                                             if req["command"] == "queue_add" else "nothing was changed"))
                    data = {"disk_full": True}     # the monitor answers 507
                else:
                    log.exception("control request %s failed", req.get("command"))
                    ok, message = False, f"internal error: {exc!r}"
            log.info("control %s from %s: %s", req["command"], req.get("source"), message)
            self.board.update(last_command={"command": req["command"], "source": req.get("source"),
                                            "ok": ok, "message": message, "at": iso()})
            try:
                ctl.write_reply(self.layout, req["id"], ok=ok, message=message, data=data)
            finally:
                path.unlink(missing_ok=True)
            self.board.flush(force=True)

    def _apply(self, command: str, args: dict[str, Any]) -> tuple[bool, str]:
        running = self.runner is not None
        if command == "pause":
            self.paused = True
            self.board.update(paused=True, paused_reason=self._disk_full or "paused by user")
            if self._disk_full is not None:
                return True, f"paused (also {self._disk_full}): stays paused when space is back"
            if running:
                self.runner.control.send(Command.PAUSE)
                return True, "pause requested: takes effect at the next step boundary"
            self.board.set_status(DaemonStatus.PAUSED)
            return True, "paused: no job will start until resume"
        if command == "resume":
            if self._disk_full is not None:
                self.paused = False
                return False, (f"{self._disk_full}: training resumes by itself when space is back "
                               f"(at least min_free_disk_mb {self.config.min_free_disk_mb:g} MiB free)")
            was = self.paused
            self.paused = False
            self.board.update(paused=False, paused_reason=None)
            if running:
                self.runner.control.send(Command.RESUME)
            elif self._stop_reason is None:
                self.board.set_status(DaemonStatus.IDLE)
            return True, "resumed" if was else "not paused; nothing to resume"
        if command == "skip":
            if not running:
                return False, "no job is running; nothing to skip"
            self.runner.control.send(Command.SKIP)
            return True, f"skip requested for {self.current.name if self.current else 'current job'}"
        if command == "stop":
            self.request_stop("trainer-ctl stop")
            return True, "stopping at the next step boundary"
        if command == "preset_switch" and running:
            return False, (f"refused: {self.current.name if self.current else 'a job'} is training; "
                           "switch presets when the queue is idle")
        if command in queueops.QUEUE_OPS:
            ok, message = queueops.apply(self.queue, command, args)
            if ok and command == "preset_switch":
                self.effective_config()
                self.db.add_event("preset", message)
            return ok, message
        return False, f"unknown command {command}"

    # ---- intake ---------------------------------------------------------------------------------
    def _intake(self) -> None:
        """Take complete inbox files in. The slow part of a big one (sha256, validation) runs on
        an IntakeCheck child process, one file at a time; the loop only starts it and, once done, moves
        the file. A small one (INLINE_CHECK_BYTES) is checked and moved at once."""
        check = self.check
        if check is not None:
            if not check.future.done():
                return
            self.check = None
            self.board.update(checking=None)
            try:
                checked = check.future.result()
            except BaseException as exc:    # noqa: BLE001 - FileChanged, gone, cancelled, a bug
                self._intake_failed(check.name, check.path, exc)
            else:
                self._accept_inbox(check.name, check.path, checked)
        if self._stop_reason is not None:   # a file not started stays in inbox/ for the next start
            return
        ready = self.tracker.ready()
        if ready:       # config.json as it is now (a changed max_bad_record_fraction applies)
            self.queue.max_bad_record_fraction = self.effective_config().max_bad_record_fraction
        for name in ready:
            path = self.layout.inbox / name
            self.tracker.forget(name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size <= INLINE_CHECK_BYTES:
                self._accept_inbox(name, path, None)     # nothing or little to read: at once
                continue
            self.check = IntakeCheck(name, path, st.st_size, self.queue.bad_record_fraction(),
                                     self.wake).start()
            log.info("checking inbox/%s (%d bytes): sha256 and validation", name, st.st_size)
            self.board.update(checking=self.check.status())
            self.board.flush(force=True)
            return

    def _accept_inbox(self, name: str, path: Path, checked: Checked | None) -> None:
        try:
            self.queue.accept(path, checked=checked)
        except Exception as exc:
            self._intake_failed(name, path, exc)

    def _intake_failed(self, name: str, path: Path, exc: BaseException) -> None:
        if isinstance(exc, FileChanged):    # still being written: look again after it settles
            log.info("%s", exc)
            self.tracker.note(name)
        elif isinstance(exc, ValidationCancelled):
            self.tracker.note(name)
        elif isinstance(exc, FileNotFoundError) and not os.path.lexists(path):
            log.info("inbox/%s vanished before it was queued", name)
        elif is_disk_full(exc):
            self.tracker.note(name)         # nothing moved: take it again once space is back
            raise exc
        elif isinstance(exc, Exception):    # the file stays in inbox/ and is seen again at the next scan
            self._report_error(f"could not queue inbox/{name}: {exc!r}", "intake_error")
        else:
            raise exc

    def _end_check(self) -> None:
        """At exit: stop a check under way; its file stays in inbox/ and is taken at the next start."""
        check, self.check = self.check, None
        if check is not None:
            check.cancel()
            log.info("inbox/%s: check interrupted by the stop; taken at the next start", check.name)
            self.board.update(checking=None)

    # ---- jobs -------------------------------------------------------------------------------
    def _start_next(self) -> None:
        if self.db.next_pending() is None:     # idle ticks stay cheap: no config or lock reads
            return
        cfg = self.effective_config()
        if free_bytes(self.layout.home) < cfg.min_free_disk_mb * MIB:
            self._enter_disk_full(f"less than min_free_disk_mb ({cfg.min_free_disk_mb:g} MiB) free "
                                  "to start a job")
            return
        job = self.queue.claim_next()
        if job is None:
            return
        self._resumed_from, self._progress = 0, False
        spec = JobSpec(job_id=job.id, name=job.name, dataset=self.queue.path(JobState.PROCESSING, job.name),
                       sha256=job.sha256 or "", home=self.layout.home, config=config_to_dict(cfg),
                       attempt=job.attempts)
        self.current = job
        self.board.clear_job()
        self.board.update(current_file=job.name, current_job_id=job.id, current_step=0,
                          trainer=cfg.trainer, base_model=cfg.base_model, model_name=cfg.model_name)
        self.board.set_status(DaemonStatus.TRAINING)
        self.db.add_event("started", f"training {job.name} (attempt {job.attempts})", job_id=job.id)
        log.info("job %s: training %s (attempt %d)", job.id, job.name, job.attempts)
        self.runner = JobRunner(self._trainer_for(cfg), spec, QueueSink(self.events, self.wake), self.wake)
        self.runner.start()

    def _trainer_for(self, cfg: Config) -> Trainer:
        """The trainer kept from the last job, unless config chose another kind since."""
        key = (cfg.trainer, cfg.standin_step_seconds)
        if self._trainer is None or key != self._trainer_key:
            self._close_trainer()
            self._trainer, self._trainer_key = self.trainer_factory(cfg), key
        return self._trainer

    def _close_trainer(self) -> None:
        """End the trainer's warm worker, if it keeps one (frees the GPU)."""
        trainer, self._trainer = self._trainer, None
        close = getattr(trainer, "close", None)
        if close is not None:
            try:
                close()
            except Exception:   # noqa: BLE001 - the stop goes on
                log.exception("closing the trainer failed")

    def _drain_events(self) -> None:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            self._on_event(ev)

    def _on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        job_id = self.current.id if self.current else None
        if kind == "preparing":
            self.board.update(preparing={k: ev.get(k) for k in ("phase", "done", "total", "percent",
                                                                 "records_per_second", "eta_seconds")})
        elif kind == "started":
            self._resumed_from = int(ev.get("resumed_from_step") or 0)
            if job_id is not None and isinstance(ev.get("dataset"), dict):
                # every attempt's report replaces the last one (a resumed attempt reads the same file)
                self.db.set_data_report(job_id, ev["dataset"])
            self.board.update(total_steps=ev.get("total_steps"), preparing=None,
                              current_step=ev.get("resumed_from_step") or 0)
        elif kind == "data_report":     # the whole file's report, once the background tokenizing ends
            if job_id is not None and isinstance(ev.get("dataset"), dict):
                self.db.set_data_report(job_id, ev["dataset"])
            self.board.update(preparing=None)
        elif kind == "step":
            fields = {k: ev.get(k) for k in ("loss", "learning_rate", "grad_norm", "tokens_per_second",
                                             "eta_seconds", "epoch", "peak_memory_bytes", "total_steps")
                      if k in ev}
            self.board.update(current_step=ev.get("step"), **fields)
            self.board.append_metric({**ev, "job_id": job_id,
                                      "file": self.current.name if self.current else None})
        elif kind == "eval":
            self.board.update(eval_loss=ev.get("eval_loss"))
            self.board.append_metric({**ev, "job_id": job_id})
        elif kind == "paused":
            self.board.set_status(DaemonStatus.PAUSED)
            self.db.add_event("paused", f"paused at step {ev.get('step')}", job_id=job_id)
        elif kind == "resumed":
            if self._stop_reason is None:
                self.board.set_status(DaemonStatus.TRAINING)
            self.db.add_event("resumed", f"resumed at step {ev.get('step')}", job_id=job_id)
        elif kind == "layer_activity":
            self.board.update(layer_activity_summary=ev.get("summary"))
            if ev.get("table") is not None:
                self.board.write_layer_activity({"step": ev.get("step"), "job_id": job_id,
                                                 "updated_at": iso(), **_as_dict(ev["table"])})
        elif kind in ("checkpoint", "snapshot", "oom_backoff", "nonfinite", "restarted"):
            if kind == "checkpoint" and int(ev.get("step") or 0) > self._resumed_from:
                self._progress = True
            msg = {"checkpoint": f"checkpoint at step {ev.get('step')} ({ev.get('reason')})",
                   "snapshot": f"snapshot saved: {ev.get('path')}",
                   "oom_backoff": f"CUDA out of memory: micro-batch {ev.get('micro_batch')}, "
                                  f"gradient accumulation {ev.get('gradient_accumulation')}",
                   "nonfinite": f"non-finite step {ev.get('step')} skipped (loss {ev.get('loss')}, "
                                f"grad norm {ev.get('grad_norm')}; {ev.get('consecutive')} in a row)",
                   "restarted": f"restarted from the start: {ev.get('reason')}"}[kind]
            self.db.add_event(kind, msg, level="info" if kind in ("checkpoint", "snapshot") else "warning",
                              job_id=job_id, data=ev)
            self.board.update(last_event={"kind": kind, "message": msg, "at": iso()})
        elif kind == "log":
            level = logging.getLevelName(str(ev.get("level", "INFO")).upper())
            log.log(level if isinstance(level, int) else logging.INFO, "trainer: %s", ev.get("message"))

    def _finish_job(self) -> None:
        """Record how the attempt ended. The queue move comes first and is atomic: if it fails
        (a full disk) nothing has changed and the loop calls this again once space is back."""
        assert self.runner is not None and self.current is not None
        self.runner.join()
        self._drain_events()
        result = self.runner.result or JobResult(Outcome.FAILED, "trainer returned nothing",
                                                 details={"crash": True})
        job = self.db.get(self.current.id)
        assert job is not None
        if result.details.get("disk_full"):
            # the disk, not the job: back to the head of the queue, resumed from its checkpoint
            self.queue.move(job, JobState.PENDING, resume=True, steps=result.steps)
            self.db.add_event("interrupted", f"{job.name}: {result.reason}; it resumes from its last "
                              "checkpoint when space is back", level="warning", job_id=job.id)
            self._enter_disk_full(result.reason or "the trainer could not write")
        elif result.outcome is Outcome.COMPLETED:
            self.queue.move(job, JobState.DONE, steps=result.steps, finished_at=time.time(), crashes=0,
                            not_before=None)
            self.db.add_event("completed", f"{job.name} trained ({result.steps} steps)", job_id=job.id)
            log.info("job %s: %s done (%d steps)", job.id, job.name, result.steps)
        elif result.outcome is Outcome.SKIPPED:
            self.queue.move(job, JobState.FAILED, error="skipped", steps=result.steps,
                            finished_at=time.time(), error_extra={"step": result.steps})
            self.db.add_event("skipped", f"{job.name} skipped at step {result.steps}", job_id=job.id)
        elif result.outcome is Outcome.STOPPED:
            if self._stop_reason is not None:
                self.db.update(job.id, steps=result.steps)
                self.db.add_event("interrupted", f"{job.name} stopped at step {result.steps}; "
                                  "it resumes at next start", job_id=job.id)
            else:
                self.queue.move(job, JobState.PENDING, resume=True, steps=result.steps)
        else:
            self._job_failed(job, result)
        self.board.update(last_job={"file": job.name, "job_id": job.id, "outcome": result.outcome.value,
                                    "steps": result.steps, "loss": self.board.state.get("loss"),
                                    "eval_loss": self.board.state.get("eval_loss"),
                                    "reason": result.reason, "finished_at": iso()})
        self.runner, self.current = None, None
        self.board.clear_job()
        if self._stop_reason is None and self._disk_full is None:
            self.board.set_status(DaemonStatus.PAUSED if self.paused else DaemonStatus.IDLE)
        try:
            for what in retention.after_job(self.layout, self.db, self.config):
                log.info("retention: %s", what)
        except Exception:  # noqa: BLE001 - housekeeping never fails a finished job
            log.exception("retention after job %s", job.id)

    def _job_failed(self, job: Job, result: JobResult) -> None:
        cfg = self.config
        reason = result.reason or "failed"
        if result.details.get("blocking"):
            # the setup is wrong (base missing or mismatched), not the data: every job would
            # fail the same way, so keep this one at the head of the queue and pause
            self.queue.move(job, JobState.PENDING, resume=True)
            self.paused = True
            self.board.update(paused=True, paused_reason=f"blocked: {reason}")
            self._report_error(f"training paused: {reason}. Fix it, then `trainer-ctl resume`", "blocked")
        elif result.details.get("crash") and self._progress:
            # it died, but after a new checkpoint: it is getting somewhere, so this is no strike
            self.queue.move(job, JobState.PENDING, resume=True, crashes=0, not_before=None)
            self._report_error(f"{job.name}: {reason}; it made progress (checkpoint past step "
                               f"{self._resumed_from}), resuming from it", "job_retry")
        elif result.details.get("crash") and job.crashes + 1 < cfg.max_attempts:
            crashes = job.crashes + 1
            delay = cfg.retry_backoff_s * min(2 ** (crashes - 1), MAX_BACKOFF_FACTOR)
            self.queue.move(job, JobState.PENDING, resume=True, crashes=crashes,
                            not_before=time.time() + delay)
            self._report_error(f"{job.name}: {reason}; {crashes} attempt(s) in a row crashed without "
                               f"progress (max_attempts {cfg.max_attempts}); retrying in {delay:g} s, "
                               "other jobs go first meanwhile", "job_retry")
        else:
            if result.details.get("crash"):
                reason = (f"{reason} ({job.crashes + 1} attempts in a row crashed without progress, "
                          f"max_attempts {cfg.max_attempts}); `trainer-ctl queue retry {job.name}`")
            self.queue.move(job, JobState.FAILED, error=reason, finished_at=time.time(),
                            crashes=job.crashes + int(bool(result.details.get("crash"))), not_before=None,
                            error_extra={k: v for k, v in result.details.items() if k != "traceback"})
            self._report_error(f"{job.name} failed: {reason}", "job_failed")

    # ---- a full disk ----------------------------------------------------------------------------
    def _enter_disk_full(self, cause: str) -> None:
        """Pause for a full disk: say so everywhere we still can, pause the worker. Never raises."""
        msg = describe_disk(self.layout.home)
        self._disk_check_at = time.monotonic() + self.config.disk_retry_interval_s
        if self._disk_full is not None:
            self._disk_full = msg
            return
        self._disk_full = msg
        self.reserve.release()          # room to write the status and the event that say so
        log.error("paused: %s (%s); training resumes by itself when space is back", msg, cause)
        if self.runner is not None and self.runner.is_alive():
            self.runner.control.send(Command.PAUSE)
        try:
            self.db.add_event("disk_full", f"paused: {msg} ({cause})", level="error")
            self.board.update(paused=True, paused_reason=msg,
                              last_error={"message": f"paused: {msg}", "at": iso(), "kind": "disk_full"})
            self.board.set_status(DaemonStatus.PAUSED)
        except Exception:   # noqa: BLE001 - the log line above is all we can do
            log.exception("could not record the disk-full pause")

    def _disk_recovered(self) -> bool:
        """In a disk-full pause: look again every disk_retry_interval_s; True once space is back."""
        if time.monotonic() < self._disk_check_at:
            return False
        self._disk_check_at = time.monotonic() + self.config.disk_retry_interval_s
        # min_free_disk_mb must be free with the reserve made again (as _start_next counts it), or
        # the reserve would take the space back and the next job start would pause again: a loop
        need = self.config.min_free_disk_mb * MIB + self.reserve.missing()
        if free_bytes(self.layout.home) < need or not self.reserve.ensure():
            msg = describe_disk(self.layout.home)
            if msg != self._disk_full:
                self._disk_full = msg
                self.board.update(paused_reason=msg)
            return False
        self.board.update(paused=self.paused, paused_reason="paused by user" if self.paused else None)
        self.board.flush(force=True)
        if self.board.write_error is not None:
            return False
        log.warning("disk space is back %s: %s", describe_disk(self.layout.home).replace("disk full ", ""),
                    "staying paused (paused by user)" if self.paused else "resuming")
        self.db.add_event("disk_ok", f"disk space is back ({free_bytes(self.layout.home) / MIB:.0f} MiB "
                          f"free); {'still paused by user' if self.paused else 'resuming'}")
        self._disk_full = None
        if self.runner is not None and self.runner.is_alive():
            if not self.paused:
                self.runner.control.send(Command.RESUME)
        elif self._stop_reason is None:
            self.board.set_status(DaemonStatus.PAUSED if self.paused else DaemonStatus.IDLE)
        return True

    # ---- the loop -----------------------------------------------------------------------------------
    def _idle(self) -> bool:
        """Nothing to do now or later (a job backing off after a crash still counts as work)."""
        return (self.runner is None and self.check is None and self.tracker.waiting() == 0
                and not self.db.has_pending())

    def _tick(self, burst: bool) -> bool:
        """One pass of the loop; True when the daemon should exit."""
        self._check_flags()
        self.queue.max_bad_record_fraction = self.config.max_bad_record_fraction   # queue add/retry
        self._handle_control()
        if self._disk_full is not None and not self._disk_recovered():
            # paused for a full disk: relay events, obey stop, write nothing else until space is back
            self._drain_events()
            if self._stop_reason is not None and (self.runner is None or not self.runner.is_alive()):
                return True     # a result not yet recorded: the job is in processing/, redone at next start
            self.board.flush()
            return False
        self._intake()
        self._drain_events()
        if self.runner is not None and not self.runner.is_alive():
            self._finish_job()
        if self._stop_reason is not None and self.runner is None:
            return True
        if self.runner is None and self._stop_reason is None and not self.paused and self._disk_full is None:
            self._start_next()      # (a job that just ended on a full disk paused the daemon above)
        if burst and self._idle() and not ctl.pending_requests(self.layout):
            return True
        if self.config.auto_generate.enabled and not burst and self._stop_reason is None \
                and not self.paused and self._disk_full is None:
            self.autogen.maybe_start(self.config.auto_generate, self._idle())
        err = self.autogen.take_error()
        if err:
            self._report_error(err, "autogen")
        if time.monotonic() - self._last_scan >= self.config.rescan_interval_s:
            if read_pid(self.layout) != os.getpid():     # deleted or overwritten by hand
                atomic_write(self.layout.pid_file, f"{os.getpid()}\n")
            self.tracker.scan()
            ctl.prune_replies(self.layout)
            self._last_scan = time.monotonic()
        if self.queue.changes != self._counted:          # only the daemon moves jobs: count on change
            self._counted = self.queue.changes
            self.board.update(queue=self.db.counts())
        self.board.flush()
        if self.board.write_error is not None:
            self._enter_disk_full(self.board.write_error)
        return False

    def run(self, burst: bool = False) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        log.info("trainerd starting in %s (pid %s)", self.layout.home, self.board.state["daemon_pid"])
        self.reserve.ensure()
        self.db.add_event("daemon_start", f"daemon started (pid {self.board.state['daemon_pid']})")
        self.queue.reconcile()
        for what in retention.startup_cleanup(self.layout, self.db, self.config):
            log.info("start-up cleanup: %s", what)
        self.effective_config()
        self.tracker.scan()
        watcher = Watcher(self.tracker, self.layout.control, self.wake)
        watcher.start()
        self.board.update(queue=self.db.counts(), trainer=self.config.trainer,
                          base_model=self.config.base_model, model_name=self.config.model_name)
        self.board.set_status(DaemonStatus.PAUSED if self.paused else DaemonStatus.IDLE)
        self._last_scan = time.monotonic()
        self._counted = -1
        try:
            while True:
                try:
                    if self._tick(burst):
                        break
                except Exception as exc:    # never die on one bad tick: log, show, back off
                    if is_disk_full(exc):   # nothing half-done: each write is atomic or transactional
                        self._enter_disk_full(f"{type(exc).__name__}: {exc}")
                    else:
                        log.exception("unexpected error in the main loop")
                        self._report_error(f"internal error: {exc!r} (the daemon goes on)", "internal_error")
                        time.sleep(1.0)
                self.wake.wait(TICK_S)
                self.wake.clear()
        finally:
            watcher.stop()
            self._end_check()
            if self.runner is not None and self.runner.is_alive():   # only on an exception path
                self.runner.control.send(Command.STOP)
                self.runner.join(timeout=60)
            self._close_trainer()
            for last_write in (lambda: self.board.update(queue=self.db.counts()),
                               lambda: self.board.set_status(DaemonStatus.STOPPED),
                               self.board.close,
                               lambda: self.db.add_event("daemon_stop", "daemon stopped "
                                                         f"({self._stop_reason or 'queue drained'})")):
                try:
                    last_write()
                except Exception:   # noqa: BLE001 - a full disk must not turn a stop into a crash
                    log.exception("while stopping")
            log.info("trainerd stopped (%s)", self._stop_reason or "queue drained")
            self.db.close()
        return 0


def _as_dict(table: Any) -> dict[str, Any]:
    return table if isinstance(table, dict) else {"modules": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainerd", description="continuous fine-tuning daemon")
    p.add_argument("--home", help="base dir (default: $TRAINER_HOME or the repo root)")
    p.add_argument("--burst", action="store_true", help="drain inbox and queue, then exit")
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="log to the log file only")
    args = p.parse_args(argv)
    layout = Layout.from_env(args.home)
    layout.ensure()
    setup_logging(layout.logs, console=not args.quiet)
    try:
        lock = DaemonLock.adopt(layout, args.lock_fd) if args.lock_fd is not None else DaemonLock(layout).acquire()
    except AlreadyRunning as exc:
        print(f"trainerd: {exc}", file=sys.stderr)
        return 1
    try:
        lock.write_pid()
        try:
            daemon = Daemon(layout)
        except ConfigError as exc:
            log.error("refusing to start: %s", exc)
            print(f"trainerd: refusing to start: {exc}", file=sys.stderr)
            return 2
        return daemon.run(burst=args.burst)
    except Exception as exc:     # only start-up can get here; a full disk is one clear line
        if not is_disk_full(exc):
            raise
        log.error("cannot start: %s: %s", describe_disk(layout.home), exc)
        print(f"trainerd: cannot start: {describe_disk(layout.home)}: "
              f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2
    finally:
        lock.release(remove_pid=True)


if __name__ == "__main__":
    sys.exit(main())
