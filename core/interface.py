"""The contract between the daemon and whatever trains a job.

The daemon calls ``Trainer.run(job, sink, control)`` for one job at a time. The trainer:
- reports through ``sink.emit(event)`` (dicts with an ``"event"`` key, see EVENT_KINDS);
- calls ``control.poll()`` at every step boundary and obeys what it returns: PAUSE (checkpoint,
  emit ``paused``, then block on ``control.wait()`` until RESUME/SKIP/STOP), SKIP (checkpoint,
  return SKIPPED), STOP (checkpoint, return STOPPED: the job is resumed at next start);
- returns a JobResult. It never moves queue files and never writes status files: the daemon is
  the single writer of those.

The same contract holds across a process boundary (trainer/worker.py): events go out as one JSON
object per line on stdout, commands come in as one JSON object per line on stdin.
"""
from __future__ import annotations

import enum
import queue
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Command(str, enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    SKIP = "skip"
    STOP = "stop"


class Outcome(str, enum.Enum):
    COMPLETED = "completed"   # -> queue/done
    SKIPPED = "skipped"       # -> queue/failed, reason "skipped"
    STOPPED = "stopped"       # stays in processing/, resumed at next start
    FAILED = "failed"         # -> queue/failed, reason given


# Event kinds a trainer may emit (all dicts carry "event"; numbers may be None when unknown):
#   heartbeat      phase, seconds: a long silent call under way (loading the base); progress for
#                  the hang limit only
#   preparing      phase (validating|tokenizing), done, total, percent, records_per_second,
#                  eta_seconds: data preparation before "started" (progress, not a hang)
#   started        total_steps, resumed_from_step
#   step           step, total_steps, loss, learning_rate, grad_norm, tokens_per_second,
#                  step_time_s, epoch, tokens, peak_memory_bytes, eta_seconds
#   eval           step, eval_loss
#   checkpoint     step, path, reason (periodic|pause|stop|skip|final)
#   layer_activity step, summary (top movers, list of dicts), table (full, for the heatmap)
#   paused / resumed   step
#   snapshot       path
#   oom_backoff    micro_batch, gradient_accumulation
#   nonfinite      step, loss, grad_norm (None where NaN/inf), consecutive, total: that step's loss
#                  or gradient norm was not finite, so it was skipped (no optimizer update; the
#                  data position and lr schedule still advance); its "step" event has loss and
#                  grad_norm None. max_nonfinite_steps in a row fail the job.
#   restarted      reason: the job's checkpoints could not be continued (current_model/ moved on
#                  since they were written, another base, another dataset): it starts again
#                  from the current adapter
#   retention      after_job, after_name, rows, seconds: the adapter on the last K retention sets
#   gate           held, summary, max_retention_regression, checked, regressions, unchecked
#                  (+ snapshot when held): the promotion gate's verdict (core/promotion.py)
#   fresh_optimizer reason: a continuous schedule could not continue current_model/'s AdamW state
#                  (trainer/continuity.py): AdamW and the schedule's step count start afresh
#   probe          step (the job's; 0 for the base), job_id, phase (base|step|end), seconds,
#                  probes [{prompt, answer, reference (str or None), source ("config" or the
#                  dataset's name)}]: greedy answers to the probe prompts (trainer/probes.py; state.db
#                  core/probetable.py); "base" is the base model alone (the adapter disabled)
#   log            level, message
EVENT_KINDS = frozenset({"started", "step", "eval", "checkpoint", "layer_activity", "paused",
                         "resumed", "snapshot", "oom_backoff", "nonfinite", "restarted", "retention",
                         "gate", "probe", "log"})


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    name: str            # the file's name as queued
    dataset: Path        # where the file is now (queue/processing/NAME)
    sha256: str
    home: Path           # the base dir (runtime layout root)
    config: dict[str, Any]
    attempt: int = 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dataset"], d["home"] = str(self.dataset), str(self.home)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "JobSpec":
        return cls(**{**d, "dataset": Path(d["dataset"]), "home": Path(d["home"])})


# JobResult.details keys the daemon acts on:
#   crash: True     the attempt died (worker crash, hang, OOM at the smallest batch): retried at
#                   once if it wrote a new checkpoint, else after a growing back-off; max_attempts
#                   such attempts in a row without progress send it to failed/
#   disk_full: True a write failed for lack of space: the job goes back to the head of the queue
#                   (no attempt counted) and the daemon pauses until space is back
#   held: {...}     (COMPLETED) the promotion gate held the adapter back: it is a held snapshot,
#                   current_model/ is unchanged; ``reason`` says "held: forgot X by N %"
#   blocking: True  the setup is wrong, not the data (base missing or mismatched): the job stays
#                   queued and the daemon pauses until the user fixes it and resumes


@dataclass
class JobResult:
    outcome: Outcome
    reason: str | None = None
    steps: int = 0
    details: dict[str, Any] = field(default_factory=dict)


class EventSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...


class ControlSource(Protocol):
    def poll(self) -> Command | None:
        """The next pending command, or None; never blocks."""

    def wait(self, timeout: float) -> Command | None:
        """Block up to *timeout* seconds for the next command."""


class QueueControl:
    """A ControlSource fed through a thread-safe queue (the daemon loop, a stdin reader thread,
    signal handlers). STOP is sticky: once sent, every later poll/wait answers STOP."""

    def __init__(self) -> None:
        self._q: "queue.Queue[Command]" = queue.Queue()
        self._stopped = threading.Event()

    def send(self, cmd: Command) -> None:
        if cmd is Command.STOP:
            self._stopped.set()
        self._q.put(cmd)

    def poll(self) -> Command | None:
        try:
            return self._q.get_nowait()
        except queue.Empty:
            return Command.STOP if self._stopped.is_set() else None

    def wait(self, timeout: float) -> Command | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return Command.STOP if self._stopped.is_set() else None


class Trainer(Protocol):
    name: str

    def run(self, job: JobSpec, sink: EventSink, control: ControlSource) -> JobResult: ...


def ends_worker(result: JobResult) -> bool:
    """A result after which a serving worker exits: its process may be in a bad state."""
    d = result.details or {}
    return bool(d.get("crash") or d.get("oom") or d.get("exception") or d.get("disk_full"))
