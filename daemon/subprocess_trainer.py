"""SubprocessTrainer: the daemon's Trainer, running jobs in a worker subprocess.

The worker is ``python -m trainer.worker --serve`` (cwd = repo root, HF_HUB_OFFLINE=1,
TOKENIZERS_PARALLELISM=true, stderr appended to home/logs/training_output.log,
PR_SET_PDEATHSIG=SIGKILL so the worker dies with the daemon). ``run(job, sink, control)``
writes the JobSpec to ``home/status/jobs/job-N-*.json`` (removed when the attempt ends; a file
left by a killed daemon is removed at its next start, daemon/retention.py), hands it to the
worker on stdin, then until the job's result line:

- relays each stdout event line to ``sink.emit`` (the daemon stays the single status writer);
- forwards every command from ``control.poll()`` to the worker's stdin as ``{"cmd": ..., "job_id": N}``;
- kills the worker (SIGKILL) when no event arrived for ``worker_timeout_s`` seconds while it is
  not paused -> FAILED "worker hung: no progress for N s", details {"crash": true, "hung": true}
  (before the job's "started" event the limit is ``startup_timeout_s``, by default the same);
- maps a worker gone without a result line to FAILED "worker died: killed by SIGKILL" / "worker
  died: exit code N", details {"crash": true, "returncode": rc} (the daemon may retry).

A CUDA OOM, segfault or hang therefore ends one attempt (and its worker), never the daemon.

A warm worker (``keep_worker=True``, what the daemon uses): the worker outlives the job with the
base loaded, and the next job with the same base settings goes to it (no torch import, no base
load: the idle time between two files drops from seconds to a fraction of one). It is replaced
when a job needs other base settings (base_model, 4-bit, device, attention, precision, gradient
checkpointing), ends after a crash (the worker exits by itself), after ``worker_idle_exit_s``
without a job (the GPU is freed), and on ``close()`` (the daemon's stop). With ``keep_worker=False``
(the default for direct use) each run gets a fresh worker that ends with it.

With ``distributed`` (N ranks) the worker is torchrun (daemon/torchrun.py), in a session of its own
so a kill takes every rank; rank 0 speaks the protocol; one group per job (no warm worker).

PR_SET_PDEATHSIG fires when the *thread* that forked the worker exits, so workers are started by
a long-lived owner thread of this object, never by the short-lived thread running a job.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.interface import Command, ControlSource, EventSink, JobResult, JobSpec, Outcome, ends_worker
from core.paths import Layout
from core.pdeathsig import set_pdeathsig
from daemon.torchrun import REPO_ROOT, worker_command, worker_env, worker_process_env, world_size

log = logging.getLogger(__name__)

_EOF = object()


def describe_returncode(rc: int | None) -> str:
    if rc is None:
        return "still running"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


# the job settings that shape the worker's loaded base: another value needs another worker
BASE_KEYS = ("base_model", "use_qlora", "device", "attn_implementation", "precision", "gradient_checkpointing",
             "distributed")


class _Worker:
    """One worker process, its stdout lines (read by a thread) and what it was started for."""

    def __init__(self, proc: "subprocess.Popen[str]", key: tuple[Any, ...], group: bool = False) -> None:
        self.proc, self.key = proc, key
        self.group = group      # torchrun and its ranks, in a process group of their own
        self.lines: "queue.Queue[Any]" = queue.Queue()
        self.idle_since = time.monotonic()
        self.busy = False
        self.jobs = 0
        threading.Thread(target=self._read, name=f"worker-{proc.pid}-stdout", daemon=True).start()

    def _read(self) -> None:
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(_EOF)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the worker; under torchrun, every rank with it (the whole process group)."""
        if self.group:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        else:
            self.proc.kill()


class SubprocessTrainer:
    """Trainer protocol over a worker subprocess (see module doc)."""

    name = "qlora"

    def __init__(self, python: str = sys.executable, module: str = "trainer.worker",
                 poll_interval: float = 0.1, worker_timeout_s: float | None = None,
                 startup_timeout_s: float | None = None, extra_env: dict[str, str] | None = None,
                 keep_worker: bool = False, idle_exit_s: float | None = None) -> None:
        self.python = python
        self.module = module
        self.poll_interval = poll_interval
        self.worker_timeout_s = worker_timeout_s  # overrides job.config["worker_timeout_s"]
        self.startup_timeout_s = startup_timeout_s  # until the "started" event; default: the same
        self.extra_env = dict(extra_env or {})
        self.keep_worker = keep_worker
        self.idle_exit_s = idle_exit_s            # overrides job.config["worker_idle_exit_s"]
        self.workers_started = 0
        self._worker: _Worker | None = None
        self._job_id: int | None = None
        self._stdin_lock = threading.Lock()
        self._lock = threading.Lock()
        self._owner: threading.Thread | None = None
        self._requests: "queue.Queue[Any]" = queue.Queue()
        self._closed = False
        self._idle_limit = 300.0

    # -------------------------------------------------------------- commands to the worker

    @property
    def worker_pid(self) -> int | None:
        w = self._worker
        return w.proc.pid if w is not None and w.alive() else None

    def send(self, cmd: Command) -> bool:
        """Write one command line (for the job under way) to the worker; False without a live worker."""
        return self._write({"cmd": cmd.value, "job_id": self._job_id})

    def _write(self, obj: dict[str, Any], worker: _Worker | None = None) -> bool:
        w = worker or self._worker
        if w is None or w.proc.stdin is None or not w.alive():
            return False
        with self._stdin_lock:
            try:
                w.proc.stdin.write(json.dumps(obj) + "\n")
                w.proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def stop_worker(self) -> bool:
        """Ask the worker to checkpoint and stop (also while it is paused). Thread-safe."""
        return self.send(Command.STOP)

    # -------------------------------------------------------------- the worker's life

    def _env(self) -> dict[str, str]:
        return {**worker_process_env(), **self.extra_env}

    def _on_owner(self, fn: Any) -> Any:
        """Run *fn* on the owner thread (started once, lives until close) and return its result."""
        with self._lock:
            if self._owner is None:
                self._owner = threading.Thread(target=self._own, name="worker-owner", daemon=True)
                self._owner.start()
        done: "queue.Queue[tuple[bool, Any]]" = queue.Queue()
        self._requests.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _own(self) -> None:
        """The owner thread: starts workers (PR_SET_PDEATHSIG ties them to this thread) and retires
        an idle one after its idle limit."""
        while True:
            try:
                item = self._requests.get(timeout=1.0)
            except queue.Empty:
                self._retire_if_idle()
                continue
            if item is None:
                return
            fn, done = item
            try:
                done.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                done.put((False, exc))

    def _retire_if_idle(self) -> None:
        with self._lock:
            w = self._worker
            if w is None or w.busy or time.monotonic() - w.idle_since < self._idle_limit:
                return
            self._worker = None
        if w.alive():
            log.info("worker pid %d idle for %.0f s: exiting (frees its memory)", w.proc.pid, self._idle_limit)
        self._retire(w)

    def _retire(self, w: _Worker, grace: float = 30.0) -> int | None:
        """End a worker: ask it to exit (a job under way stops at its next step), then kill."""
        if w.alive():
            self._write({"exit": True}, w)
        try:
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        except OSError:
            pass
        try:
            rc = w.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            w.kill()
            rc = w.proc.wait()
        if w.group:
            w.kill()        # a rank that outlived torchrun (it should not): never left behind
        if w.proc.stdout is not None:
            try:
                w.proc.stdout.close()
            except OSError:
                pass
        return rc

    def _spawn(self, home: Path, key: tuple[Any, ...], config: dict[str, Any]) -> _Worker:
        cmd = worker_command(self.python, config, self.module)
        ranked = world_size(config) > 1
        env = {**self._env(), **(worker_env(config) if ranked else {})}
        with open(home / "logs" / "training_output.log", "ab") as log_fh:
            log_fh.write(f"\n===== worker: {' '.join(cmd)}\n".encode())
            log_fh.flush()
            proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log_fh, text=True, bufsize=1,
                                    preexec_fn=set_pdeathsig, close_fds=True, start_new_session=ranked)
        self.workers_started += 1
        log.info("worker pid %d started%s", proc.pid, f" (torchrun, {world_size(config)} ranks)" if ranked else "")
        return _Worker(proc, key, group=ranked)

    def _worker_for(self, job: JobSpec) -> _Worker:
        """The warm worker if it suits *job*, else a fresh one (the old one retired first)."""
        key = (str(job.home),) + tuple(json.dumps(job.config.get(k), sort_keys=True) for k in BASE_KEYS)
        with self._lock:
            if self._closed:
                raise RuntimeError("this trainer was closed")
            w, self._worker = self._worker, None
        if w is not None and w.alive() and w.key == key:
            with self._lock:    # busy before it is back in view: the idle check must not retire it
                w.busy, self._worker = True, w
            return w
        if w is not None:
            if w.alive():
                log.info("worker pid %d: the base settings changed; starting a fresh worker", w.proc.pid)
            self._retire(w)
        w = self._on_owner(lambda: self._spawn(Path(job.home), key, job.config))
        with self._lock:
            w.busy, self._worker = True, w
        return w

    def close(self) -> None:
        """End the worker (freeing the GPU) and the owner thread. Idempotent."""
        with self._lock:
            self._closed = True
            w, self._worker = self._worker, None
            owner = self._owner
        if w is not None:
            self._retire(w)
        if owner is not None:
            self._requests.put(None)
            owner.join(timeout=10)

    # -------------------------------------------------------------- run

    def run(self, job: JobSpec, sink: EventSink, control: ControlSource) -> JobResult:
        home = Path(job.home)
        (home / "logs").mkdir(parents=True, exist_ok=True)
        timeout = float(self.worker_timeout_s if self.worker_timeout_s is not None
                        else job.config.get("worker_timeout_s", 600.0))
        self._idle_limit = float(self.idle_exit_s if self.idle_exit_s is not None
                                 else job.config.get("worker_idle_exit_s", 300.0))
        specs = Layout(home).job_specs
        specs.mkdir(parents=True, exist_ok=True)
        fd, job_file = tempfile.mkstemp(prefix=f"job-{job.job_id}-", suffix=".json", dir=specs)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(job.to_json(), fh)
            startup = float(self.startup_timeout_s) if self.startup_timeout_s is not None else timeout
            return self._run(job, sink, control, Path(job_file), timeout, startup)
        finally:
            Path(job_file).unlink(missing_ok=True)

    def _run(self, job: JobSpec, sink: EventSink, control: ControlSource, job_file: Path,
             timeout: float, startup_timeout: float) -> JobResult:
        w = self._worker_for(job)
        with open(Path(job.home) / "logs" / "training_output.log", "ab") as log_fh:
            log_fh.write(f"\n===== job {job.job_id} {job.name} attempt {job.attempt} (worker pid "
                         f"{w.proc.pid}{', warm' if w.jobs else ''})\n".encode())
        self._job_id = job.job_id
        w.jobs += 1
        result: JobResult | None = None
        hung: str | None = None
        gone = False
        try:
            if not self._write({"job": str(job_file), "job_id": job.job_id}, w):
                gone = True
            result, hung, gone = self._relay(w, job, sink, control, timeout, startup_timeout, gone)
        finally:
            with self._lock:
                w.busy, self._job_id = False, None
                w.idle_since = time.monotonic()
            if result is None or not self.keep_worker or self._idle_limit <= 0 or w.group \
                    or ends_worker(result) or not w.alive():     # a crashed worker exits by itself
                with self._lock:
                    if self._worker is w:
                        self._worker = None
                if hung is not None or (result is None and not gone):
                    w.kill()       # hung, or an exception here: never leave it behind
                rc = self._retire(w)
            else:
                rc = None
        if hung is not None:
            return JobResult(Outcome.FAILED, reason=hung,
                             details={"crash": True, "hung": True, "returncode": rc})
        if result is None:
            reason = f"worker died: {describe_returncode(rc)}"
            log.error("job %d: %s", job.job_id, reason)
            return JobResult(Outcome.FAILED, reason=reason, details={"crash": True, "returncode": rc})
        if rc not in (0, None):
            result.details.setdefault("returncode", rc)
        return result

    def _relay(self, w: _Worker, job: JobSpec, sink: EventSink, control: ControlSource, timeout: float,
               startup_timeout: float, gone: bool) -> tuple[JobResult | None, str | None, bool]:
        """Events to the sink and commands to the worker until this job's result (or the
        worker's end, or a hang). Returns (result, hung reason, worker gone)."""
        paused = started = False
        last_event = time.monotonic()
        while not gone:
            cmd_in = control.poll()
            if cmd_in is not None and not self.send(cmd_in):
                log.warning("could not forward %s: worker stdin closed", cmd_in.value)
            try:
                item = w.lines.get(timeout=self.poll_interval)
            except queue.Empty:
                item = None
            if item is _EOF:
                return None, None, True
            if item is not None:
                last_event = time.monotonic()
                ev = self._parse(item)
                if ev is None:
                    continue
                kind = ev.get("event")
                if kind == "result":
                    if ev.get("job_id", job.job_id) != job.job_id:
                        log.warning("worker sent the result of job %s during job %d: ignored",
                                    ev.get("job_id"), job.job_id)
                        continue
                    return self._to_result(ev), None, False
                if kind == "started":
                    started = True
                if kind == "paused":
                    paused = True
                elif kind in ("resumed", "started", "step"):
                    paused = False
                try:
                    sink.emit(ev)
                except Exception:  # noqa: BLE001 - a sink bug must not kill the job
                    log.exception("sink.emit failed for %s", kind)
                continue
            limit = timeout if started else startup_timeout
            if not paused and time.monotonic() - last_event > limit:
                hung = f"worker hung: no progress for {limit:g} s"
                log.error("%s; killing pid %d", hung, w.proc.pid)
                w.kill()
                return None, hung, False
        return None, None, True

    @staticmethod
    def _parse(line: str) -> dict[str, Any] | None:
        line = line.strip()
        if not line:
            return None
        try:
            ev = json.loads(line)
        except ValueError:
            log.warning("worker printed a non-JSON line: %.200s", line)
            return None
        if not isinstance(ev, dict) or "event" not in ev:
            log.warning("worker sent an object without 'event': %.200s", line)
            return None
        return ev

    @staticmethod
    def _to_result(ev: dict[str, Any]) -> JobResult:
        try:
            outcome = Outcome(ev.get("outcome"))
        except ValueError:
            return JobResult(Outcome.FAILED, reason=f"worker sent an unknown outcome {ev.get('outcome')!r}")
        return JobResult(outcome, reason=ev.get("reason"), steps=int(ev.get("steps") or 0),
                         details=dict(ev.get("details") or {}))
