"""SubprocessTrainer: the daemon's Trainer, running each job in a worker subprocess.

``run(job, sink, control)`` writes the JobSpec to ``home/status/jobs/job-N-*.json`` (removed when the
attempt ends; a file left by a killed daemon is removed at its next start, daemon/retention.py)
and starts ``python -m trainer.worker --job JOB.json`` (cwd = repo root,
HF_HUB_OFFLINE=1, TOKENIZERS_PARALLELISM=true, stderr appended to home/logs/training_output.log,
PR_SET_PDEATHSIG=SIGKILL so the worker dies with the calling thread), then until the worker ends:

- relays each stdout event line to ``sink.emit`` (the daemon stays the single status writer);
- forwards every command from ``control.poll()`` to the worker's stdin as ``{"cmd": ...}``;
- kills the worker (SIGKILL) when no event arrived for ``worker_timeout_s`` seconds while it is
  not paused -> FAILED "worker hung: no progress for N s", details {"crash": true, "hung": true}
  (before the worker's "started" event the limit is ``startup_timeout_s``, by default the same);
- maps an exit without a result line to FAILED "worker died: killed by SIGKILL" / "worker died:
  exit code N", details {"crash": true, "returncode": rc} (the daemon may retry).

A CUDA OOM, segfault or hang therefore ends one attempt, never the daemon.

Note: PR_SET_PDEATHSIG fires when the *thread* that forked the worker exits; ``run`` blocks
until the worker is gone, so call it from a thread that lives at least that long.
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
from typing import IO, Any

from daemon.paths import Layout
from trainer.interface import Command, ControlSource, EventSink, JobResult, JobSpec, Outcome
from daemon.pdeathsig import set_pdeathsig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
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


class SubprocessTrainer:
    """Trainer protocol over a worker subprocess (see module doc)."""

    name = "qlora"

    def __init__(self, python: str = sys.executable, module: str = "trainer.worker",
                 poll_interval: float = 0.1, worker_timeout_s: float | None = None,
                 startup_timeout_s: float | None = None, extra_env: dict[str, str] | None = None) -> None:
        self.python = python
        self.module = module
        self.poll_interval = poll_interval
        self.worker_timeout_s = worker_timeout_s  # overrides job.config["worker_timeout_s"]
        self.startup_timeout_s = startup_timeout_s  # until the "started" event; default: the same
        self.extra_env = dict(extra_env or {})
        self._proc: subprocess.Popen[str] | None = None
        self._stdin_lock = threading.Lock()

    # -------------------------------------------------------------- commands to the worker

    @property
    def worker_pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def send(self, cmd: Command) -> bool:
        """Write one command line to the worker's stdin; False if there is no live worker."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.poll() is not None:
            return False
        with self._stdin_lock:
            try:
                proc.stdin.write(json.dumps({"cmd": cmd.value}) + "\n")
                proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def stop_worker(self) -> bool:
        """Ask the worker to checkpoint and stop (also while it is paused). Thread-safe."""
        return self.send(Command.STOP)

    # -------------------------------------------------------------- run

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the worker tokenizes in batches on all cores (trainer/tokencache.py; the result does not
        # depend on it) and never forks, so the tokenizers' thread pool is safe there
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true",
                    "PYTHONUNBUFFERED": "1"})
        pp = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
        env.update(self.extra_env)
        return env

    @staticmethod
    def _reader(stream: IO[str], q: "queue.Queue[Any]") -> None:
        try:
            for line in stream:
                q.put(line)
        except (OSError, ValueError):
            pass
        q.put(_EOF)

    def run(self, job: JobSpec, sink: EventSink, control: ControlSource) -> JobResult:
        home = Path(job.home)
        (home / "logs").mkdir(parents=True, exist_ok=True)
        timeout = float(self.worker_timeout_s if self.worker_timeout_s is not None
                        else job.config.get("worker_timeout_s", 600.0))
        specs = Layout(home).job_specs
        specs.mkdir(parents=True, exist_ok=True)
        fd, job_file = tempfile.mkstemp(prefix=f"job-{job.job_id}-", suffix=".json", dir=specs)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(job.to_json(), fh)
            with open(home / "logs" / "training_output.log", "ab") as log_fh:
                startup = float(self.startup_timeout_s) if self.startup_timeout_s is not None else timeout
                return self._run(job, sink, control, Path(job_file), log_fh, timeout, startup)
        finally:
            Path(job_file).unlink(missing_ok=True)

    def _run(self, job: JobSpec, sink: EventSink, control: ControlSource, job_file: Path,
             log_fh: IO[bytes], timeout: float, startup_timeout: float) -> JobResult:
        cmd = [self.python, "-m", self.module, "--job", str(job_file)]
        log_fh.write(f"\n===== job {job.job_id} {job.name} attempt {job.attempt}: {' '.join(cmd)}\n".encode())
        log_fh.flush()
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=self._env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log_fh, text=True, bufsize=1,
                                preexec_fn=set_pdeathsig, close_fds=True)
        self._proc = proc
        log.info("worker pid %d started for job %d", proc.pid, job.job_id)
        lines: queue.Queue[Any] = queue.Queue()
        reader = threading.Thread(target=self._reader, args=(proc.stdout, lines), daemon=True,
                                  name=f"worker-{proc.pid}-stdout")
        reader.start()

        result: JobResult | None = None
        hung: str | None = None
        paused = False
        started = False
        last_event = time.monotonic()
        try:
            while True:
                cmd_in = control.poll()
                if cmd_in is not None:
                    if not self.send(cmd_in):
                        log.warning("could not forward %s: worker stdin closed", cmd_in.value)
                try:
                    item = lines.get(timeout=self.poll_interval)
                except queue.Empty:
                    item = None
                if item is _EOF:
                    break
                if item is not None:
                    last_event = time.monotonic()
                    ev = self._parse(item)
                    if ev is None:
                        continue
                    kind = ev.get("event")
                    if kind == "result":
                        result = self._to_result(ev)
                        continue
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
                    log.error("%s; killing pid %d", hung, proc.pid)
                    proc.kill()
                    break
            rc = self._reap(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for s in (proc.stdin, proc.stdout):
                try:
                    if s is not None:
                        s.close()
                except OSError:
                    pass
            self._proc = None
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

    @staticmethod
    def _reap(proc: subprocess.Popen[str], grace: float = 30.0) -> int | None:
        # stdout hit EOF (or we killed it): the worker is exiting; don't wait forever.
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

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
