"""The daemon's jobs: start the next one, relay its events, record how it ended.

Part of :class:`daemon.main.Daemon` (a mixin: the state lives in ``Daemon.__init__``). The
trainer runs in a :class:`JobRunner` thread (and, for the real trainer, a worker subprocess) and
talks to the loop through a queue of events; an ended attempt's outcome moves the job: done/,
back to pending/ (resumed from its checkpoint, maybe after a back-off), or failed/.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from core import evaltable, probetable
from core.atomic import atomic_write_json
from core.config import Config, config_to_dict
from core.diskfull import MIB, free_bytes, is_disk_full
from core.interface import JobResult, JobSpec, Outcome, QueueControl, Trainer
from core.statedb import Job, counter_key
from core.states import DaemonStatus, JobState
from daemon import retention
from daemon.status import iso

if TYPE_CHECKING:
    from daemon.main import Daemon

log = logging.getLogger("trainerd")

# state.db counters (/metrics adds _total): optimizer steps run (a step redone after a crash counts
# again), the loss-carrying tokens of those steps, the NaN/inf steps skipped
STEPS, TOKENS, NONFINITE = "trainer_steps", "trainer_tokens_trained", "trainer_nonfinite_steps"
MAX_BACKOFF_FACTOR = 64         # a crash-looping job waits retry_backoff_s x 1, 2, 4 ... 64 at most


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


def _as_dict(table: Any) -> dict[str, Any]:
    return table if isinstance(table, dict) else {"modules": table}


class JobFlow:
    """Starting, relaying and ending jobs (see the module doc)."""

    def _count(self: "Daemon", name: str, by: Any) -> None:
        """Add to a state.db counter; kept here and written by ``flush_counts`` (each
        status_interval_s and at a job's end): one transaction, not one per step."""
        if isinstance(by, (int, float)) and not isinstance(by, bool) and by > 0:
            key = counter_key(name)
            self._counts[key] = self._counts.get(key, 0.0) + float(by)

    def flush_counts(self: "Daemon") -> None:
        """Write the counts kept so far. On a full disk they stay here and are written later: a
        counter is never the reason for a disk-full pause (the writes that matter say that)."""
        counts, self._counts = self._counts, {}
        try:
            self.db.add_counts(counts)
        except Exception as exc:
            for key, by in counts.items():        # written next time
                self._counts[key] = self._counts.get(key, 0.0) + by
            if not is_disk_full(exc):
                raise
            log.debug("counters kept in memory for now: %s", exc)

    def _start_next(self: "Daemon") -> None:
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
        self._resumed_from, self._progress, self._base_fingerprint = 0, False, None
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

    def _trainer_for(self: "Daemon", cfg: Config) -> Trainer:
        """The trainer kept from the last job, unless config chose another kind since."""
        key = (cfg.trainer, cfg.standin_step_seconds)
        if self._trainer is None or key != self._trainer_key:
            self._close_trainer()
            self._trainer, self._trainer_key = self.trainer_factory(cfg), key
        return self._trainer

    def _close_trainer(self: "Daemon") -> None:
        """End the trainer's warm worker, if it keeps one (frees the GPU)."""
        trainer, self._trainer = self._trainer, None
        close = getattr(trainer, "close", None)
        if close is not None:
            try:
                close()
            except Exception:   # noqa: BLE001 - the stop goes on
                log.exception("closing the trainer failed")

    def _drain_events(self: "Daemon") -> None:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            self._on_event(ev)

    def _on_event(self: "Daemon", ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        job_id = self.current.id if self.current else None
        if kind == "preparing":
            self.board.update(preparing={k: ev.get(k) for k in ("phase", "done", "total", "percent",
                                                                 "records_per_second", "eta_seconds")})
        elif kind == "started":
            self._resumed_from = int(ev.get("resumed_from_step") or 0)
            fp = ev.get("base_fingerprint")
            self._base_fingerprint = fp if isinstance(fp, str) else None
            if job_id is not None and isinstance(ev.get("dataset"), dict):
                # every attempt's report replaces the last one (a resumed attempt reads the same file)
                self.db.set_data_report(job_id, ev["dataset"])
            self.board.update(total_steps=ev.get("total_steps"), preparing=None,
                              current_step=ev.get("resumed_from_step") or 0, ranks=int(ev.get("ranks") or 1))
        elif kind == "data_report":     # the whole file's report, once the background tokenizing ends
            if job_id is not None and isinstance(ev.get("dataset"), dict):
                self.db.set_data_report(job_id, ev["dataset"])
            self.board.update(preparing=None)
        elif kind == "step":
            fields = {k: ev.get(k) for k in ("loss", "learning_rate", "grad_norm", "tokens_per_second",
                                             "eta_seconds", "epoch", "peak_memory_bytes", "total_steps")
                      if k in ev}
            self.board.update(current_step=ev.get("step"), **fields)
            self._count(STEPS, 1)
            self._count(TOKENS, ev.get("trained_tokens"))
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
        elif kind in ("checkpoint", "snapshot", "oom_backoff", "nonfinite", "restarted", "fresh_adapter",
                      "fresh_optimizer"):
            if kind == "checkpoint" and int(ev.get("step") or 0) > self._resumed_from:
                self._progress = True
            if kind == "nonfinite":
                self._count(NONFINITE, 1)
            msg = {"checkpoint": f"checkpoint at step {ev.get('step')} ({ev.get('reason')})",
                   "snapshot": f"snapshot saved: {ev.get('path')}",
                   "oom_backoff": f"CUDA out of memory: micro-batch {ev.get('micro_batch')}, "
                                  f"gradient accumulation {ev.get('gradient_accumulation')}",
                   "nonfinite": f"non-finite step {ev.get('step')} skipped (loss {ev.get('loss')}, "
                                f"grad norm {ev.get('grad_norm')}; {ev.get('consecutive')} in a row)",
                   "restarted": f"restarted from the start: {ev.get('reason')}",
                   "fresh_adapter": f"a fresh adapter: the LoRA settings changed ({ev.get('reason')}); the "
                                    f"previous one ({ev.get('previous')}) stays in snapshots/",
                   "fresh_optimizer": f"a fresh AdamW and schedule count: {ev.get('reason')}"}[kind]
            self.db.add_event(kind, msg, level="info" if kind in ("checkpoint", "snapshot") else "warning",
                              job_id=job_id, data=ev)
            self.board.update(last_event={"kind": kind, "message": msg, "at": iso()})
        elif kind == "retention":
            self._record_retention(ev)
        elif kind == "gate":
            self._record_gate(ev, job_id)
        elif kind == "probe":
            self._record_probe(ev, job_id)
        elif kind == "log":
            level = logging.getLevelName(str(ev.get("level", "INFO")).upper())
            log.log(level if isinstance(level, int) else logging.INFO, "trainer: %s", ev.get("message"))

    def _record_retention(self: "Daemon", ev: dict[str, Any]) -> None:
        """One adapter's column of the forgetting matrix: state.db, then status/eval.json."""
        rows = [r for r in ev.get("rows") or [] if isinstance(r, dict)]
        after = ev.get("after_job") if isinstance(ev.get("after_job"), int) else None
        if after is None:
            return
        evaltable.add_rows(self.db, after, ev.get("after_name"), rows)
        atomic_write_json(self.layout.eval_file, evaltable.matrix(evaltable.read_rows(self.db)))
        done = [r for r in rows if r.get("loss") is not None]
        self.db.add_event("retention", f"retention eval after {ev.get('after_name')}: {len(done)} of "
                          f"{len(rows)} dataset(s) in {ev.get('seconds')} s", job_id=after,
                          data={"rows": rows, "seconds": ev.get("seconds")})

    def _record_probe(self: "Daemon", ev: dict[str, Any], job_id: int | None) -> None:
        """One round of probe answers: state.db's probes table (core/probetable.py), and an event."""
        n = probetable.add(self.db, ev, dataset=self.current.name if self.current else None,
                           base_fingerprint=self._base_fingerprint)
        if n:
            what = {"base": "the base", "end": f"the end of the job (step {ev.get('step')})"}.get(
                str(ev.get("phase")), f"step {ev.get('step')}")
            self.db.add_event("probe", f"probe answers at {what}: {n} prompt(s) in {ev.get('seconds')} s",
                              job_id=job_id)

    def _record_gate(self: "Daemon", ev: dict[str, Any], job_id: int | None) -> None:
        """The promotion gate's verdict (core/promotion.py): a ``held`` warning with the numbers,
        or ``gate_passed``."""
        name = self.current.name if self.current else "?"
        regs = [r for r in ev.get("regressions") or [] if isinstance(r, dict)]
        numbers = "; ".join(f"{r.get('dataset')}: loss {r.get('reference_loss'):.4f} -> {r.get('loss'):.4f}"
                            for r in regs[:5] if isinstance(r.get("loss"), (int, float))
                            and isinstance(r.get("reference_loss"), (int, float)))
        limit = ev.get("max_retention_regression")
        if ev.get("held"):
            snap = str(ev.get("snapshot") or "?").rsplit("/", 1)[-1]
            msg = (f"{name} completed ({ev.get('summary')}; {numbers + '; ' if numbers else ''}"
                   f"max_retention_regression {limit}): current_model/ unchanged, the adapter is kept as "
                   f"snapshots/{snap} (trainer-ctl promote {snap})")
            self.db.add_event("held", msg, level="warning", job_id=job_id, data=ev)
            self.board.update(last_event={"kind": "held", "message": msg, "at": iso()})
        else:
            self.db.add_event("gate_passed", f"{name}: promotion gate {ev.get('summary')}", job_id=job_id, data=ev)

    def _finish_job(self: "Daemon") -> None:
        """Record how the attempt ended. The queue move comes first and is atomic: if it fails
        (a full disk) nothing has changed and the loop calls this again once space is back."""
        assert self.runner is not None and self.current is not None
        self.runner.join()
        self._drain_events()
        self.flush_counts()
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
                            not_before=None, outcome="held" if result.details.get("held") else None)
            held = f" ({result.reason}; current_model/ unchanged)" if result.details.get("held") else ""
            self.db.add_event("completed", f"{job.name} completed{held}: trained {result.steps} steps" if held
                              else f"{job.name} trained ({result.steps} steps)",
                              level="warning" if held else "info", job_id=job.id)
            log.info("job %s: %s done (%d steps)%s", job.id, job.name, result.steps, held)
        elif result.outcome is Outcome.SKIPPED:
            self.queue.move(job, JobState.FAILED, error="skipped", outcome="skipped", steps=result.steps,
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
                                    "reason": result.reason, "finished_at": iso(),
                                    "held": result.details.get("held")})
        self.runner, self.current = None, None
        self.board.clear_job()
        if self._stop_reason is None and self._disk_full is None:
            self.board.set_status(DaemonStatus.PAUSED if self.paused else DaemonStatus.IDLE)
        try:
            for what in retention.after_job(self.layout, self.db, self.config):
                log.info("retention: %s", what)
        except Exception:  # noqa: BLE001 - housekeeping never fails a finished job
            log.exception("retention after job %s", job.id)

    def _job_failed(self: "Daemon", job: Job, result: JobResult) -> None:
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
