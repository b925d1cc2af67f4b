"""trainerd: the supervisor loop.

One thread owns the queue, state.db and the status files. Watchdog and signal handlers only
set flags/wake the loop (huey's consumer); the trainer runs in a runner thread (and, for the
real trainer, a worker subprocess) and talks to the loop through two queues. ``run(burst=True)``
drains inbox and queue and returns (rq's burst worker), which makes tests deterministic.

The loop's parts, one module each: control requests (daemon/commands.py), jobs and their events
(daemon/jobflow.py), the disk-full pause (daemon/diskpause.py); intake, config and the loop here.
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
from pathlib import Path
from typing import Any, Callable

from core import evaltable, probetable
from core.atomic import atomic_write
from core.artifacts import current_lora
from core.config import LORA_KEYS, Config, ConfigError, describe_locked_diffs, load_config, locked_diffs
from core.diskfull import Reserve, describe as describe_disk, is_disk_full
from core.interface import Command, Trainer
from core.lock import AlreadyRunning, DaemonLock, read_pid
from core.logsetup import setup_logging
from core.paths import Layout
from core.promotion import recover_promotion
from core.statedb import Counts, Job, StateDB
from core.states import DaemonStatus
from core.validation import ValidationCancelled
from daemon import control as ctl, retention
from daemon.autogen import AutoGenerator
from daemon.fsqueue import FsQueue
from daemon.intakefile import Checked, FileChanged, printable
from daemon.intakecheck import IntakeCheck
from daemon.presets import recover_preset_switch
from daemon.status import StatusBoard, iso
from daemon.watcher import InboxTracker, Watcher
from daemon.commands import Commands
from daemon.diskpause import DiskPause
from daemon.jobflow import JobFlow, JobRunner

log = logging.getLogger("trainerd")

TICK_S = 0.2
INLINE_CHECK_BYTES = 1 << 20    # an inbox file up to this size is checked on the loop (some ms);
                                # a bigger one in an IntakeCheck child process


def recover_interrupted_consolidation(layout: Layout) -> None:
    """Finish or undo a consolidation that a crash interrupted (its journal says which)."""
    if not (layout.status_dir / "consolidation.json").exists() and not any(layout.consolidated.glob(".tmp-*")):
        return          # the common case: no torch import at daemon start
    from core.switch import recover_consolidation
    what = recover_consolidation(layout.home)
    if what:
        log.warning("consolidation recovery: %s", what)


class Daemon(Commands, JobFlow, DiskPause):
    def __init__(self, layout: Layout, *, trainer_factory: Callable[[Config], Trainer] | None = None) -> None:
        layout.ensure()
        self.layout = layout
        recover_interrupted_consolidation(layout)         # before config and locked keys are read
        recover_preset_switch(layout)
        recover_promotion(layout.home)                    # an interrupted promote / rollback
        self.config = load_config(layout.config)          # ConfigError: refuse to start
        self._config_mtime = self._mtime(layout.config)
        self._config_error: str | None = None
        self._locked_msg: str | None = None
        self.db = StateDB(layout.state_db)
        evaltable.ensure(self.db)                         # the forgetting matrix and probe answers
        probetable.ensure(self.db)
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
        self._base_fingerprint: str | None = None     # the running attempt's base (its "started" event)
        self._stop_reason: str | None = None
        self._counts: Counts = {}                 # counter increments not yet in state.db
        self._counts_at = 0.0
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
        if any(k in LORA_KEYS for k in fresh):   # an adapter made before they were locked keeps its own
            fresh.update({k: v for k, v in current_lora(self.layout.home).items() if k in fresh})
        if fresh:
            self.db.record_locked(fresh, ns)
            recorded = {**recorded, **fresh}
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
        if self._counts and time.monotonic() - self._counts_at >= self.config.status_interval_s:
            self._counts_at = time.monotonic()
            self.flush_counts()
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
            for last_write in (self.flush_counts, lambda: self.board.update(queue=self.db.counts()),
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trainerd", description="continuous fine-tuning daemon")
    p.add_argument("--home", help="base dir (default: $TRAINER_HOME or the repo root)")
    p.add_argument("--burst", action="store_true", help="drain inbox and queue, then exit")
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="log to the log file only")
    p.add_argument("--follow", metavar="HOST:PORT",
                   help="run this node's ranks of a multi-node run whose main node is HOST:PORT")
    p.add_argument("--node-rank", type=int, default=1, help="with --follow: this node's rank (1..nnodes-1)")
    args = p.parse_args(argv)
    if args.follow:
        from daemon.follower import main as follow
        return follow(args.home, args.follow, args.node_rank)
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
