"""bin/monitor.sh: foreground and --background starts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from daemon_helpers import REPO, env_for, wait_for
from monitor_helpers import free_port, make_home


def test_background_start_pidfile_and_refusal(tmp_path) -> None:
    home = make_home(tmp_path / "home")
    env = env_for(home.path)
    env.pop("TRAINER_MONITOR_TOKEN", None)
    port = free_port()
    script = str(REPO / "bin/monitor.sh")
    r = subprocess.run([script, "--background", "--home", str(home.path), "--port", str(port)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    pid = int((home.path / "logs/monitor.pid").read_text())
    try:
        wait_for(lambda: _up(port), timeout=10, what="monitor up")
        again = subprocess.run([script, "--background", "--home", str(home.path), "--port", str(port)],
                               env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 0 and f"already running (pid {pid})" in again.stdout
    finally:
        os.kill(pid, signal.SIGTERM)
    bad = subprocess.run([script, "--home", str(home.path), "--host", "0.0.0.0", "--port", str(free_port())],
                         env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "without a token" in bad.stderr


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_monitor_never_imports_torch() -> None:
    code = ("import sys, monitor.app, monitor.__main__; from core.paths import Layout; "
            "monitor.app.create_app(Layout.from_env('/nonexistent-home')); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer', 'transformers', 'peft')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
