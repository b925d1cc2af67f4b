"""bin/launch_training_daemon.sh: one daemon per base dir, however many launches."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys

from daemon_helpers import REPO, alive, env_for, wait_for


def test_launch_starts_one_background_daemon_with_pid_and_log(home):
    r = home.launch()
    assert "trainerd started (pid" in r.stdout
    pid = home.pid()
    assert pid and alive(pid)
    st = wait_for(lambda: home.status().get("daemon_pid") == pid and home.status(), what="status")
    assert st["status"] == "idle"
    day = dt.date.today().strftime("%Y%m%d")
    assert "trainerd starting" in (home.path / f"logs/daemon_{day}.log").read_text()
    s = home.ctl("status")
    assert s.returncode == 0 and "idle" in s.stdout


def test_ten_launchers_at_once_start_exactly_one(home):
    procs = [subprocess.Popen([str(REPO / "bin/launch_training_daemon.sh")], env=env_for(home.path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(10)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    home.started.append(home.pid())
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1, results
    pid = home.pid()
    assert alive(pid)
    for rc, _out, err in losers:
        assert rc == 1
        assert f"already running (pid {pid})" in err
    # and only one trainerd process for this home exists
    ps = subprocess.run(["pgrep", "-f", f"daemon --home {home.path}"], capture_output=True, text=True)
    assert len(ps.stdout.split()) == 1


def test_second_launch_refused_while_running(home):
    home.launch()
    r = home.launch(check=False)
    assert r.returncode == 1 and f"already running (pid {home.pid()})" in r.stderr


def test_stale_pid_file_does_not_block(home):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home.path / ".daemon.pid").write_text(f"{dead.pid}\n")
    r = home.launch()
    assert r.returncode == 0 and home.pid() != dead.pid and alive(home.pid())


def test_invalid_config_refuses_to_start_naming_the_key(home):
    (home.path / "config.json").write_text('{"max_length": "long", "batch_sise": 4}')
    r = home.launch(check=False)
    assert r.returncode == 2
    assert "max_length" in r.stderr and "batch_sise: unknown key" in r.stderr


def test_status_when_daemon_down_says_so_with_exit_3(home):
    r = home.ctl("status")
    assert r.returncode == 3 and "daemon not running" in r.stdout
    r = home.ctl("status", "--json")
    assert r.returncode == 3 and '"daemon_running": false' in r.stdout
    r = home.ctl("pause")
    assert r.returncode == 3 and "daemon not running" in r.stderr
