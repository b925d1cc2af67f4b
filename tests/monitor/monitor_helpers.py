"""Helpers for the monitor tests: a real uvicorn monitor as a subprocess on a free loopback port,
a home dir with a real daemon (stand-in trainer), and a tiny SSE reader."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from daemon_helpers import REPO, Home, alive, env_for, wait_for
from core.paths import Layout

REQ = {"X-Trainer-Request": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Monitor:
    """``python -m monitor`` for one home, on a free port; stopped with SIGTERM then SIGKILL."""

    def __init__(self, home: Path, *, host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.home = home
        self.host = host
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = env_for(home)
        self.env.pop("TRAINER_MONITOR_TOKEN", None)
        self.env.update(env or {})
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log_path = home / f"monitor-{self.port}.out"

    def start(self, wait: bool = True) -> "Monitor":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "--home", str(self.home), "--host", self.host,
             "--port", str(self.port), "--log-level", "warning", *self.extra],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            def up() -> bool:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"monitor exited {self.proc.returncode}: {self.output()}")
                try:
                    return httpx.get(self.base + "/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_for(up, timeout=20, interval=0.05, what="monitor /healthz")
        return self

    def output(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=kw.pop("timeout", 15), **kw)


def prometheus_samples(text: str) -> dict[str, dict[tuple, float]]:
    """A /metrics exposition parsed by prometheus-client: {sample name: {sorted labels: value}}."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def promtool_problems(text: str) -> str | None:
    """What `promtool check metrics` says about an exposition ("" when clean); None without promtool."""
    tool = shutil.which("promtool")
    if tool is None:
        return None
    p = subprocess.run([tool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30,
                       check=False)
    problems = (p.stdout + p.stderr).decode().strip()
    assert p.returncode == 0 or problems, f"promtool exited {p.returncode} without saying why"
    return problems


def make_home(path: Path, **config: Any) -> Home:
    h = Home(path)
    Layout(h.path).ensure()
    h.write_config(**config)
    return h


def stop_daemon(home: Home) -> None:
    """Stop the daemon gracefully (so the status file says so), SIGKILL if it hangs."""
    pid = home.pid()
    if not pid:
        return
    home.ctl("stop")
    try:
        wait_for(lambda: home.pid() is None and not alive(pid), timeout=10, what="daemon exit")
    except AssertionError:
        home.kill_all()


class SSEReader:
    """Reads /api/stream in a thread; collects (time, event, data)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.events: list[tuple[float, str, Any]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.connected = threading.Event()

    def _run(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(5, read=None)) as c:
            with c.stream("GET", self.url, headers=self.headers) as r:
                self.status_code = r.status_code
                self.connected.set()
                event, data = "message", []
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if line == "":
                        if data:
                            with self.lock:
                                self.events.append((time.monotonic(), event, json.loads("\n".join(data))))
                        event, data = "message", []
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())

    def start(self) -> "SSEReader":
        self.thread.start()
        assert self.connected.wait(10), "stream did not connect"
        return self

    def stop(self) -> None:
        self._stop.set()

    def of(self, name: str) -> list[tuple[float, Any]]:
        with self.lock:
            return [(t, d) for t, e, d in self.events if e == name]
