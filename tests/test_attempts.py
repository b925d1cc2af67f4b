"""Restarts are not failures; a poison job backs off and fails alone (issue 9, item 2).

Only an attempt whose worker crashed without a new checkpoint counts against ``max_attempts``:
a `trainer-ctl stop`, a daemon restart or a SIGKILL of the daemon never do.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

from daemon_helpers import STANDIN, alive, text_records, wait_for, write_jsonl
from daemon.main import Daemon
from core.paths import Layout
from core.statedb import StateDB
from core.interface import ControlSource, EventSink, JobResult, JobSpec
from daemon.standin import StandInTrainer
from daemon.subprocess_trainer import SubprocessTrainer


def _jobs(home) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads(home.ctl("queue", "list", "--json").stdout)}


def _crashes(home, name: str) -> int:
    db = StateDB(home.path / "status/state.db", readonly=True)
    try:
        return db.by_name(name).crashes
    finally:
        db.close()


def test_stops_restarts_and_daemon_kills_never_fail_a_healthy_job(home):
    # max_attempts 1: a single counted attempt would fail the job at once
    home.write_config(standin_step_seconds=0.1, max_attempts=1)
    write_jsonl(home.path / "inbox/healthy.jsonl", text_records(60, "h"))
    step = 0
    for how in ("stop", "stop", "sigkill", "sigkill", "stop"):
        home.launch()
        pid = home.pid()
        wait_for(lambda: (home.status().get("current_step") or 0) > step and home.status().get("daemon_pid") == pid,
                 timeout=30, what=f"training under daemon {pid}")
        step = home.status()["current_step"]
        if how == "stop":
            assert home.ctl("stop").returncode == 0
        else:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), timeout=30, what=f"daemon gone after {how}")
        assert home.files("processing") == ["healthy.jsonl"] and not home.files("failed")
        assert _crashes(home, "healthy.jsonl") == 0
    home.launch()
    wait_for(lambda: home.files("done") == ["healthy.jsonl"], timeout=60, what="the job done")
    job = _jobs(home)["healthy.jsonl"]
    assert job["state"] == "done" and job["attempts"] >= 6
    assert _crashes(home, "healthy.jsonl") == 0
    assert "interrupted" not in (job.get("error") or "")


POISON_WORKER = """#!/bin/sh
# a worker that dies by SIGKILL at start for the poison dataset, every time
echo "$(date +%s.%N)" >> "{starts}"
kill -9 $$
"""


class PoisonOr:
    """The real SubprocessTrainer for poison.jsonl (its worker dies at start), the stand-in for the rest."""

    def __init__(self, worker: Path) -> None:
        self.poison = SubprocessTrainer(python=str(worker), worker_timeout_s=30)
        self.good = StandInTrainer(0.01)

    def run(self, job: JobSpec, sink: EventSink, control: ControlSource) -> JobResult:
        trainer = self.poison if Path(job.dataset).name.startswith("poison") else self.good
        return trainer.run(job, sink, control)


def test_a_poison_job_backs_off_then_fails_while_the_queue_goes_on(home, tmp_path):
    starts = tmp_path / "starts.txt"
    worker = tmp_path / "worker.sh"
    worker.write_text(POISON_WORKER.format(starts=starts))
    worker.chmod(worker.stat().st_mode | stat.S_IXUSR)
    (home.path / "config.json").write_text(json.dumps({**STANDIN, "max_attempts": 3, "retry_backoff_s": 0.6,
                                                       "inbox_stable_seconds": 0}))
    inbox = home.path / "inbox"
    now = time.time()
    for i, name in enumerate(["poison.jsonl", "a.jsonl", "b.jsonl"]):     # poison arrived first
        os.utime(write_jsonl(inbox / name, text_records(3, name)), (now - 100 + i, now - 100 + i))
    d = Daemon(Layout(home.path), trainer_factory=lambda c: PoisonOr(worker))
    try:
        d.run(burst=True)
    finally:   # the in-process daemon wrote its pid (ours) there: the fixture must not kill us
        (home.path / ".daemon.pid").unlink(missing_ok=True)

    assert home.files("done") == ["a.jsonl", "b.jsonl"] and home.files("failed") == ["poison.jsonl"]
    reason = home.error("poison.jsonl")["reason"]
    assert "3 attempts in a row crashed without progress, max_attempts 3" in reason, reason
    assert "trainer-ctl queue retry poison.jsonl" in reason
    t = [float(x) for x in starts.read_text().split()]
    assert len(t) == 3, "one worker start per attempt"
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert gaps[0] >= 0.6 and gaps[1] >= 1.2, gaps          # 0.6 s, then doubled
    db = StateDB(home.path / "status/state.db", readonly=True)
    try:
        events = sorted(db.events(limit=1000), key=lambda e: e["id"])
        poison = db.by_name("poison.jsonl")
    finally:
        db.close()
    assert poison.crashes == 3 and poison.not_before is None
    # the others did not wait for the poison job: both completed before its last attempt
    completed = [e["ts"] for e in events if e["kind"] == "completed"]
    assert len(completed) == 2 and max(completed) < t[-1]
    retries = [e["message"] for e in events if e["kind"] == "job_retry"]
    assert len(retries) == 2 and "retrying in 0.6 s" in retries[0] and "retrying in 1.2 s" in retries[1]
    assert all("other jobs go first meanwhile" in m for m in retries)

    # `queue retry` gives it a fresh count (the user fixed something)
    assert home.ctl("queue", "retry", "poison.jsonl").returncode == 0
    db = StateDB(home.path / "status/state.db", readonly=True)
    try:
        again = db.by_name("poison.jsonl")
        assert again.state == "pending" and again.crashes == 0 and again.not_before is None
    finally:
        db.close()
