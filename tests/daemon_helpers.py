"""Helpers for tests: a base dir per test, the real launcher, the real trainer-ctl, waiting.

(Not named conftest: tests/trainer has its own conftest.py, and two modules named conftest
shadow each other depending on collection order.)
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable


REPO = Path(__file__).resolve().parent.parent
STANDIN = {"trainer": "standin", "standin_step_seconds": 0.05, "inbox_stable_seconds": 0.3,
           "rescan_interval_s": 1.0, "status_interval_s": 0.2}


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "TRAINER_HOME": str(home), "TRAINER_PYTHON": sys.executable,
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


class Home:
    """A base dir with its own config, and the real scripts pointed at it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started: list[int] = []

    def write_config(self, **overrides: Any) -> None:
        (self.path / "config.json").write_text(json.dumps({**STANDIN, **overrides}))

    def launch(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(REPO / "bin/launch_training_daemon.sh"), *extra], env=env_for(self.path),
                           capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, r.stderr + r.stdout
        pid = self.pid()
        if pid:
            self.started.append(pid)
        return r

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.ctl", *args], env=env_for(self.path),
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    def burst(self, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "daemon", "--burst", "--quiet"], env=env_for(self.path),
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def pid(self) -> int | None:
        try:
            return int((self.path / ".daemon.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "status/training_status.json").read_text())
        except FileNotFoundError:
            return {}

    def files(self, state: str) -> list[str]:
        d = self.path / "queue" / state
        return sorted(p.name for p in d.iterdir() if not p.name.endswith(".error.json")) if d.exists() else []

    def error(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / "queue/failed" / f"{name}.error.json").read_text())

    def log_text(self) -> str:
        return "".join(p.read_text() for p in sorted((self.path / "logs").glob("daemon_2*.log")))

    def kill_all(self) -> None:
        for pid in set(self.started + ([self.pid()] if self.pid() else [])):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def text_records(n: int, tag: str = "") -> list[dict[str, str]]:
    return [{"text": f"record {i} {tag}"} for i in range(n)]


def reverse_records(n: int, seed: int) -> list[dict]:
    """A second task for the retention tests, unlike daemon.generator's arithmetic: reverse the word."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(4, 9))) for _ in range(n)]
    return [{"messages": [{"role": "user", "content": f"reverse the word {w}"},
                          {"role": "assistant", "content": w[::-1]}]} for w in words]
