"""The training worker process: ``python -m trainer.worker --job JOB.json``.

Runs one job (a JobSpec as JSON) through the in-process recipe (QLoRATrainer) and speaks the
trainer contract over pipes:

- stdout: events, one JSON object per line, flushed each; the last line is
  ``{"event": "result", "outcome": ..., "reason": ..., "steps": ..., "details": {...}}``.
  The real stdout fd is kept for events only; fd 1 is pointed at stderr, so a library that
  prints cannot corrupt the protocol.
- stdin: commands, ``{"cmd": "pause"|"resume"|"skip"|"stop"}`` one per line, read by a thread.
  EOF on stdin means stop (the daemon went away or closed the pipe). SIGTERM/SIGINT mean stop.
- stderr: log lines (the daemon appends them to logs/training_output.log).

``daemon.pdeathsig.set_pdeathsig`` (the parent's ``preexec_fn``) makes the kernel SIGKILL the worker when
the thread that spawned it dies, so a SIGKILLed daemon leaves no orphan training.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any

from daemon.diskfull import disk_error

from trainer.interface import Command, JobResult, JobSpec, Outcome, QueueControl

log = logging.getLogger("trainer.worker")


class JsonLineSink:
    """EventSink writing one JSON object per line to *stream*, flushed, thread-safe."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=_json_default, allow_nan=False)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _sanitize(obj: Any) -> Any:
    """NaN/inf are not JSON: turn them into None."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


class SanitizingSink:
    def __init__(self, inner: JsonLineSink) -> None:
        self.inner = inner

    def emit(self, event: dict[str, Any]) -> None:
        self.inner.emit(_sanitize(event))


def parse_command(line: str) -> Command | None:
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
        name = obj.get("cmd") if isinstance(obj, dict) else obj
    except ValueError:
        name = line
    try:
        return Command(str(name).lower())
    except ValueError:
        log.warning("ignoring unknown command %r", line)
        return None


def start_stdin_reader(stream: IO[str], control: QueueControl) -> threading.Thread:
    def run() -> None:
        try:
            for line in stream:
                cmd = parse_command(line)
                if cmd is not None:
                    log.info("command from daemon: %s", cmd.value)
                    control.send(cmd)
        except (OSError, ValueError):
            pass
        log.info("stdin closed: stopping at the next step boundary")
        control.send(Command.STOP)

    t = threading.Thread(target=run, name="stdin-commands", daemon=True)
    t.start()
    return t


def result_event(result: JobResult) -> dict[str, Any]:
    return {"event": "result", "outcome": result.outcome.value, "reason": result.reason,
            "steps": result.steps, "details": result.details}


def _protocol_stdout() -> IO[str]:
    """A private copy of fd 1 for events; fd 1 itself now goes to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(os.dup(2), "w", buffering=1)  # stray prints -> stderr
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.worker")
    ap.add_argument("--job", required=True, type=Path, help="JobSpec JSON file")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = _protocol_stdout()
    sink = SanitizingSink(JsonLineSink(out))
    control = QueueControl()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: control.send(Command.STOP))
    start_stdin_reader(sys.stdin, control)

    sink.emit({"event": "log", "level": "info", "message": f"worker pid {os.getpid()} starting"})
    try:
        job = JobSpec.from_json(json.loads(args.job.read_text(encoding="utf-8")))
        from trainer.recipe import QLoRATrainer

        log.info("worker pid %d: job %d %s (attempt %d)", os.getpid(), job.job_id, job.name, job.attempt)
        result = QLoRATrainer().run(job, sink, control)
    except BaseException as exc:  # noqa: BLE001 - report every failure as a result line
        log.error("worker failed:\n%s", traceback.format_exc())
        err = disk_error(exc)
        if err is not None:       # the disk, not the job: the daemon pauses and resumes it later
            result = JobResult(Outcome.FAILED, reason=f"disk full: {type(err).__name__}: {err}",
                               details={"disk_full": True, "exception": type(exc).__name__})
        else:
            result = JobResult(Outcome.FAILED, reason=f"worker error: {type(exc).__name__}: {exc}",
                               details={"exception": type(exc).__name__,
                                        "traceback": traceback.format_exc()[-4000:]})
    sink.emit(result_event(result))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
