"""Event sink and control source for running the recipe in-process in tests, and a real worker
subprocess killed with SIGKILL mid-job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.interface import Command

REPO = Path(__file__).resolve().parents[2]


class ListSink:
    """Collects events; each must be JSON-safe, as the worker protocol requires."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, ev: dict[str, Any]) -> None:
        json.dumps(ev, allow_nan=False)
        self.events.append(ev)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


class NoControl:
    def poll(self) -> None:
        return None

    def wait(self, timeout: float) -> None:
        return None


class StopAfter:
    """A real ControlSource: STOP once the step event *n* was emitted into *sink*."""

    def __init__(self, sink: ListSink, n: int) -> None:
        self.sink, self.n, self.sent = sink, n, False

    def poll(self) -> Command | None:
        steps = self.sink.of("step")
        if not self.sent and steps and steps[-1]["step"] == self.n:
            self.sent = True
            return Command.STOP
        return None

    def wait(self, timeout: float) -> Command | None:
        return self.poll()


def start_worker_and_kill(job_file: Path, kill_after: int) -> dict[int, float]:
    """Run a real worker; SIGKILL it as soon as it reports step *kill_after*."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.worker", "--job", str(job_file)], cwd=REPO,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    losses: dict[int, float] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            ev = json.loads(line)
            assert ev["event"] != "result", f"worker finished before the kill: {ev}"
            if ev["event"] == "step":
                losses[ev["step"]] = ev["loss"]
                if ev["step"] >= kill_after:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
    finally:
        rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL
    return losses
