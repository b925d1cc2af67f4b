"""The training worker process: ``python -m trainer.worker --job JOB.json`` runs one job;
``python -m trainer.worker --serve`` runs job after job, keeping the base loaded (a warm worker).

Runs one job (a JobSpec as JSON) through the in-process recipe (QLoRATrainer) and speaks the
trainer contract over pipes:

- stdout: events, one JSON object per line, flushed each; the last line is
  ``{"event": "result", "outcome": ..., "reason": ..., "steps": ..., "details": {...}}``.
  The real stdout fd is kept for events only; fd 1 is pointed at stderr, so a library that
  prints cannot corrupt the protocol.
- stdin: commands, ``{"cmd": "pause"|"resume"|"skip"|"stop"}`` one per line, read by a thread.
  EOF on stdin means stop (the daemon went away or closed the pipe). SIGTERM/SIGINT mean stop.
- stderr: log lines (the daemon appends them to logs/training_output.log).

Serving (``--serve``): stdin carries ``{"job": "JOB.json", "job_id": N}`` to start a job and
``{"cmd": ..., "job_id": N}`` commands for it (a command tagged with another job is dropped: it
came too late for a job that already ended); ``{"exit": true}`` or EOF ends the worker (a job
under way is stopped at its next step boundary first). Each job ends with its result line
(carrying ``job_id``) and the worker waits for the next. The quantized base and tokenizer stay
loaded between jobs (trainer/warm.py); adapter, optimizer and data are per job. After a job that
crashed (an exception, out of memory, a disk error) the worker exits: the next job gets a fresh
process, so a crash is still isolated.

``core.pdeathsig.set_pdeathsig`` (the parent's ``preexec_fn``) makes the kernel SIGKILL the worker when
the thread that spawned it dies, so a SIGKILLed daemon leaves no orphan training.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any

from core.diskfull import disk_error
from core.interface import Command, JobResult, JobSpec, Outcome, QueueControl, ends_worker

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


def _setup_process() -> IO[str]:
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # grown and shrunk in segments: less fragmentation over many jobs and OOM back-offs
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return _protocol_stdout()


def run_job(job_file: Path | dict[str, Any], sink: Any, control: QueueControl, trainer: Any = None,
            ranked: bool = False) -> JobResult:
    """One job, every failure turned into a FAILED result (a disk error says so). *ranked* (one
    of N torchrun ranks): an unexpected error is a crash, retried from the last checkpoint (a
    peer that died breaks the collectives of the others)."""
    try:
        raw = job_file if isinstance(job_file, dict) else json.loads(job_file.read_text(encoding="utf-8"))
        job = JobSpec.from_json(raw)
        from trainer.recipe import QLoRATrainer

        log.info("worker pid %d: job %d %s (attempt %d)", os.getpid(), job.job_id, job.name, job.attempt)
        return (trainer or QLoRATrainer()).run(job, sink, control)
    except BaseException as exc:  # noqa: BLE001 - report every failure as a result line
        log.error("worker failed:\n%s", traceback.format_exc())
        err = disk_error(exc)
        if err is not None:       # the disk, not the job: the daemon pauses and resumes it later
            return JobResult(Outcome.FAILED, reason=f"disk full: {type(err).__name__}: {err}",
                             details={"disk_full": True, "exception": type(exc).__name__})
        return JobResult(Outcome.FAILED, reason=f"{'a rank' if ranked else 'worker'} error: "
                                               f"{type(exc).__name__}: {exc}",
                         details={"exception": type(exc).__name__, **({"crash": True} if ranked else {}),
                                  "traceback": traceback.format_exc()[-4000:]})


class Serving:
    """The serving loop's inbox: jobs to run, commands for the job under way, the end."""

    def __init__(self) -> None:
        self.jobs: "queue.Queue[tuple[Path, int] | None]" = queue.Queue()
        self._lock = threading.Lock()
        self.current: tuple[int, QueueControl] | None = None
        self.ending = False

    def begin(self, job_id: int) -> QueueControl:
        control = QueueControl()
        with self._lock:
            self.current = (job_id, control)
            if self.ending:
                control.send(Command.STOP)
        return control

    def finish(self) -> None:
        with self._lock:
            self.current = None

    def command(self, cmd: Command, job_id: int | None) -> None:
        with self._lock:
            if self.current is not None and (job_id is None or job_id == self.current[0]):
                self.current[1].send(cmd)
            else:
                log.info("command %s for job %s dropped: no such job under way", cmd.value, job_id)

    def end(self) -> None:
        with self._lock:
            self.ending = True
            if self.current is not None:
                self.current[1].send(Command.STOP)
        self.jobs.put(None)

    def read(self, stream: IO[str]) -> None:
        """stdin: job, command and exit lines, until EOF (= exit)."""
        try:
            for line in stream:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    log.warning("ignoring a line that is not a JSON object: %.200s", line.strip())
                    continue
                if obj.get("exit"):
                    break
                if "job" in obj:
                    self.jobs.put((Path(str(obj["job"])), int(obj.get("job_id") or 0)))
                    continue
                cmd = parse_command(json.dumps(obj.get("cmd")))
                if cmd is not None:
                    log.info("command from daemon: %s", cmd.value)
                    self.command(cmd, obj.get("job_id"))
        except (OSError, ValueError):
            pass
        log.info("worker told to exit (or stdin closed)")
        self.end()


def serve(sink: Any) -> int:
    """Run jobs from stdin one after the other with one warm base (see the module doc)."""
    from trainer.recipe import QLoRATrainer
    from trainer.warm import WarmBase

    serving = Serving()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: serving.end())
    threading.Thread(target=serving.read, args=(sys.stdin,), name="stdin-commands", daemon=True).start()
    trainer = QLoRATrainer(warm=WarmBase())
    sink.emit({"event": "log", "level": "info", "message": f"worker pid {os.getpid()} serving"})
    while True:
        item = serving.jobs.get()
        if item is None:
            break
        job_file, job_id = item
        control = serving.begin(job_id)
        try:
            result = run_job(job_file, sink, control, trainer)
        finally:
            serving.finish()
        sink.emit({**result_event(result), "job_id": job_id})
        if ends_worker(result):
            log.info("job %d ended with a crash: this worker exits, the next job gets a fresh one", job_id)
            break
    return 0


class NullSink:
    """The events of a rank other than 0: rank 0 alone reports."""

    def emit(self, event: dict[str, Any]) -> None:
        pass


def serve_ranks() -> int:
    """One of torchrun's N ranks (``--serve`` under torchrun): rank 0 takes one job from stdin as
    the serving loop does and broadcasts it; every rank trains it (trainer/distributed.py); rank 0
    reports the result; then the group ends (the next job gets a fresh group). A rank dies with
    torchrun (PR_SET_PDEATHSIG); SIGTERM (torchrun ending the group) ends it at once."""
    from core.pdeathsig import set_pdeathsig
    from trainer.distributed import Ranks
    from trainer.recipe import QLoRATrainer

    set_pdeathsig()
    if os.getppid() == 1:       # torchrun already gone
        return 1
    rank = int(os.environ.get("RANK", 0))
    serving = Serving()
    if rank == 0:
        out = _setup_process()
        sink: Any = SanitizingSink(JsonLineSink(out))
        threading.Thread(target=serving.read, args=(sys.stdin,), name="stdin-commands", daemon=True).start()
    else:
        _setup_process()            # events go nowhere: fd 1 is stderr
        sink = NullSink()
    ranks = Ranks.from_env()
    job: dict[str, Any] | None = None
    job_id = 0
    if ranks.is_main:
        sink.emit({"event": "log", "level": "info",
                   "message": f"worker pid {os.getpid()} serving as {ranks} (torchrun)"})
        item = serving.jobs.get()
        if item is not None:
            job_id = item[1]
            job = json.loads(item[0].read_text(encoding="utf-8"))
    job = ranks.share_object(job)
    if job is None:
        return 0
    control = serving.begin(job_id) if ranks.is_main else QueueControl()
    result = run_job(job, sink, control, QLoRATrainer(ranks=ranks), ranked=True)
    if ranks.is_main:
        sink.emit({**result_event(result), "job_id": job_id})
    log.info("%s: job %d done (%s)", ranks, int(job.get("job_id") or 0), result.outcome.value)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.worker")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--job", type=Path, help="JobSpec JSON file: run this one job and exit")
    mode.add_argument("--serve", action="store_true", help="run jobs given on stdin, keeping the base loaded")
    args = ap.parse_args(argv)

    if args.serve and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return serve_ranks()
    out = _setup_process()
    sink = SanitizingSink(JsonLineSink(out))
    if args.serve:
        code = serve(sink)
        out.flush()
        return code
    control = QueueControl()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: control.send(Command.STOP))
    start_stdin_reader(sys.stdin, control)
    sink.emit({"event": "log", "level": "info", "message": f"worker pid {os.getpid()} starting"})
    sink.emit(result_event(run_job(args.job, sink, control)))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
