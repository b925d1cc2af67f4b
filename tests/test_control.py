"""trainer-ctl pause|resume|skip|stop, touch .stop, SIGTERM, and SIGKILL then restart."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

from daemon_helpers import alive, text_records, wait_for, write_jsonl


def _training(home, n=200, name="long.jsonl", step_s=0.05):
    home.write_config(standin_step_seconds=step_s)
    home.launch()
    write_jsonl(home.path / "inbox" / name, text_records(n, name))
    wait_for(lambda: home.status().get("status") == "training" and (home.status().get("current_step") or 0) >= 2,
             what="training")


def test_pause_resume_at_step_boundary_acknowledged_in_status(home):
    _training(home)
    r = home.ctl("pause")
    assert r.returncode == 0 and "pause" in r.stdout
    st = wait_for(lambda: home.status().get("status") == "paused" and home.status(), what="paused")
    assert st["last_command"]["command"] == "pause" and st["last_command"]["ok"]
    step = st["current_step"]
    time.sleep(0.6)
    assert home.status()["current_step"] == step, "steps advanced while paused"
    assert home.ctl("resume").returncode == 0
    wait_for(lambda: home.status().get("status") == "training" and home.status()["current_step"] > step,
             what="resumed and stepping")


def test_skip_moves_current_job_to_failed_and_goes_on(home):
    _training(home)
    write_jsonl(home.path / "inbox/next.jsonl", text_records(3, "next"))
    wait_for(lambda: home.files("pending") == ["next.jsonl"], what="next queued")
    assert home.ctl("skip").returncode == 0
    wait_for(lambda: home.files("done") == ["next.jsonl"], what="next trained")
    assert home.files("failed") == ["long.jsonl"]
    err = home.error("long.jsonl")
    assert err["reason"] == "skipped" and err["step"] >= 2
    r = home.ctl("skip")
    assert r.returncode == 1 and "nothing to skip" in r.stderr


def test_stop_ends_daemon_and_job_resumes_at_next_start(home):
    _training(home)
    pid = home.pid()
    assert home.ctl("stop").returncode == 0
    wait_for(lambda: not alive(pid), what="daemon exit")
    assert home.status()["status"] == "stopped"
    assert home.files("processing") == ["long.jsonl"]        # left to resume
    home.write_config(standin_step_seconds=0.0)
    home.launch()
    wait_for(lambda: home.files("done") == ["long.jsonl"], what="resumed job done")
    assert "back to the head of pending" in home.log_text()


def test_emergency_stop_flag(home):
    _training(home)
    pid = home.pid()
    (home.path / ".stop").touch()
    wait_for(lambda: not alive(pid), timeout=10, what="daemon exit on .stop")
    assert not (home.path / ".stop").exists()
    assert "emergency stop" in home.log_text()
    assert home.files("processing") == ["long.jsonl"]


def test_sigterm_is_a_graceful_stop(home):
    _training(home)
    pid = home.pid()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), timeout=10, what="daemon exit on SIGTERM")
    assert home.status()["status"] == "stopped"
    assert "received SIGTERM" in home.log_text()


def test_sigkill_mid_job_then_restart_loses_nothing(home):
    _training(home, n=100)
    write_jsonl(home.path / "inbox/waiting.jsonl", text_records(2, "w"))
    wait_for(lambda: home.files("pending") == ["waiting.jsonl"], what="second file queued")
    home.ctl("queue", "prioritize", "waiting.jsonl", "high")
    os.kill(home.pid(), signal.SIGKILL)
    wait_for(lambda: not alive(home.pid()), what="killed")
    assert home.files("processing") == ["long.jsonl"]
    # the interrupted job goes to the head of the queue, even before a high-priority one
    home.write_config(standin_step_seconds=0.0)
    home.launch()
    wait_for(lambda: home.files("done") == ["long.jsonl", "waiting.jsonl"], what="both done")
    jobs = {j["name"]: j for j in json.loads(home.ctl("queue", "list", "--json").stdout)}
    assert jobs["long.jsonl"]["finished_at"] < jobs["waiting.jsonl"]["started_at"]
    assert jobs["long.jsonl"]["attempts"] == 2
    assert "interrupted in processing/" in home.log_text()


def test_status_file_is_never_torn(home):
    home.write_config(standin_step_seconds=0.0, status_interval_s=0.01)
    write_jsonl(home.path / "inbox/many.jsonl", text_records(3000))
    bad: list[str] = []
    done = threading.Event()

    def reader():
        path = home.path / "status/training_status.json"
        while not done.is_set():
            try:
                json.loads(path.read_text())
            except FileNotFoundError:
                pass
            except ValueError as exc:
                bad.append(str(exc))

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert home.burst().returncode == 0
    finally:
        done.set()
        t.join()
    assert bad == []
    st = home.status()
    for key in ("status", "current_file", "current_step", "total_steps", "loss", "learning_rate",
                "tokens_per_second", "eta_seconds", "queue", "last_error", "updated_at", "daemon_pid"):
        assert key in st
    assert st["queue"]["done"] == 1
