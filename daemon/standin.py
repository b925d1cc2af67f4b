"""A stand-in trainer: walks the dataset one record per step, no model. For queue tests and demos
on machines where the real trainer is not wanted (config ``"trainer": "standin"``)."""
from __future__ import annotations

import time

from core.interface import Command, ControlSource, EventSink, JobResult, JobSpec, Outcome
from core.validation import iter_records


class StandInTrainer:
    name = "standin"

    def __init__(self, step_seconds: float = 0.05) -> None:
        self.step_seconds = step_seconds

    def run(self, job: JobSpec, sink: EventSink, control: ControlSource) -> JobResult:
        records = [line for line, _ in iter_records(job.dataset)]
        total = len(records)
        sink.emit({"event": "started", "total_steps": total, "resumed_from_step": 0})
        t0 = time.monotonic()
        for step in range(1, total + 1):
            time.sleep(self.step_seconds)
            elapsed = time.monotonic() - t0
            sink.emit({"event": "step", "step": step, "total_steps": total, "loss": None,
                       "learning_rate": None, "tokens_per_second": None,
                       "eta_seconds": elapsed / step * (total - step), "line": records[step - 1]})
            cmd = control.poll()
            while cmd is Command.PAUSE:
                sink.emit({"event": "paused", "step": step})
                cmd = control.wait(3600.0)
                while cmd is None or cmd is Command.PAUSE:
                    cmd = control.wait(3600.0)
                if cmd is Command.RESUME:
                    sink.emit({"event": "resumed", "step": step})
                    cmd = control.poll()
            if cmd is Command.SKIP:
                return JobResult(Outcome.SKIPPED, "skipped", steps=step)
            if cmd is Command.STOP:
                return JobResult(Outcome.STOPPED, "stopped", steps=step)
        return JobResult(Outcome.COMPLETED, steps=total)
