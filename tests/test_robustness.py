"""Regressions from the data-loss review: each was reproduced against real processes first."""
from __future__ import annotations

import json
import os
import time

from daemon.fsqueue import FsQueue
from core.paths import Layout
from core.statedb import StateDB
from core.states import JobState
from daemon_helpers import alive, text_records, wait_for, write_jsonl


def test_writer_pausing_longer_than_the_stable_interval_is_not_taken_while_open(home):
    home.write_config(inbox_stable_seconds=0.3)
    home.launch()
    path = home.path / "inbox/paused.jsonl"
    with open(path, "w") as fh:
        for i in range(3):
            fh.write(json.dumps({"text": f"a{i}"}) + "\n")
        fh.flush()
        time.sleep(1.5)                              # five stable intervals, file still open
        assert path.exists(), "taken while its writer still had it open"
        for i in range(3):
            fh.write(json.dumps({"text": f"b{i}"}) + "\n")
    wait_for(lambda: home.files("done") == ["paused.jsonl"], what="trained after close")
    job = json.loads(home.ctl("queue", "list", "--json").stdout)[0]
    assert job["records"] == 6 and job["steps"] == 6


def test_malformed_control_requests_are_set_aside_and_the_daemon_goes_on(home):
    home.launch()
    ctl_dir = home.path / "control"
    (ctl_dir / "0001-noid.json").write_text('{"command": "pause"}')
    (ctl_dir / "0002-escape.json").write_text('{"command": "pause", "id": "../../../escaped"}')
    (ctl_dir / "0003-garbage.json").write_text("{not json")
    wait_for(lambda: len(list((ctl_dir / "rejected").glob("*.json"))) == 3, what="set aside")
    assert alive(home.pid()) and not (home.path.parent.parent / "escaped.json").exists()
    assert home.status()["status"] == "idle"                  # none of them was applied
    write_jsonl(home.path / "inbox/after.jsonl", text_records(2))
    wait_for(lambda: home.files("done") == ["after.jsonl"], what="still working")


def test_stale_control_request_is_answered_expired_not_applied(home):
    stale = {"id": "00000000000000000001-deadbeef", "command": "stop", "args": {}, "source": "cli",
             "requested_at": time.time() - 3600}
    (home.path / "control" / f"{stale['id']}.json").write_text(json.dumps(stale))
    home.launch()
    reply = wait_for(lambda: (home.path / f"control/replies/{stale['id']}.json").exists()
                     and json.loads((home.path / f"control/replies/{stale['id']}.json").read_text()))
    assert reply["ok"] is False and "expired" in reply["message"]
    assert alive(home.pid())


def test_non_utf8_file_name_is_queued_and_the_daemon_survives(home):
    home.launch()
    raw = os.fsencode(str(home.path / "inbox")) + b"/caf\xe9.jsonl"
    with open(raw, "wb") as fh:
        fh.write(b'{"text": "hello"}\n')
    wait_for(lambda: home.files("done"), what="trained")
    job = json.loads(home.ctl("queue", "list", "--json").stdout)[0]
    assert job["original_name"] == "caf\ufffd.jsonl" and job["name"].endswith(".jsonl")
    assert alive(home.pid())


def test_non_utf8_config_is_a_clear_error_at_start_and_survivable_while_running(home):
    (home.path / "config.json").write_bytes('{"model_name": "Modèle"}'.encode("latin-1"))
    r = home.launch(check=False)
    assert r.returncode == 2 and "not UTF-8" in r.stderr
    home.write_config()
    home.launch()
    (home.path / "config.json").write_bytes('{"model_name": "Modèle"}'.encode("latin-1"))
    write_jsonl(home.path / "inbox/a.jsonl", text_records(2))
    wait_for(lambda: home.files("done") == ["a.jsonl"], what="trained with the previous settings")
    assert alive(home.pid()) and "not UTF-8" in home.status()["last_error"]["message"]


def test_deleting_the_pid_file_never_allows_a_second_daemon(home):
    home.launch()
    first = home.pid()
    (home.path / ".daemon.pid").unlink()         # the lock is on the base dir itself, not a file
    r = home.launch(check=False)                 # the daemon re-writes its pid file within a rescan
    assert r.returncode == 1 and f"already running (pid {first})" in r.stderr
    assert alive(first)


def test_pending_file_removed_by_hand_is_recorded_missing_and_the_queue_goes_on(home):
    home.write_config(standin_step_seconds=0.0)
    for n in ("gone", "kept"):
        write_jsonl(home.path / f"inbox/{n}.jsonl", text_records(1, n))
    layout = Layout(home.path)
    db = StateDB(layout.state_db)
    q = FsQueue(layout, db)
    for n in ("gone", "kept"):
        q.accept(layout.inbox / f"{n}.jsonl")
    os.unlink(layout.state_dir(JobState.PENDING) / "gone.jsonl")
    assert home.burst().returncode == 0
    assert home.files("done") == ["kept.jsonl"]
    assert db.by_name("gone.jsonl").state == "missing"


def test_direct_mode_reconciles_before_acting(home):
    layout = Layout(home.path)
    db = StateDB(layout.state_db)
    write_jsonl(layout.inbox / "c.jsonl", text_records(1))
    FsQueue(layout, db).accept(layout.inbox / "c.jsonl")
    # crash between a rename and its row update: the file is in processing/, the row says pending
    os.rename(layout.state_dir(JobState.PENDING) / "c.jsonl", layout.state_dir(JobState.PROCESSING) / "c.jsonl")
    r = home.ctl("queue", "remove", "c.jsonl")
    assert r.returncode == 0, r.stderr                 # reconciled first: back in pending, then removed
    assert home.files("failed") == ["c.jsonl"] and home.files("processing") == []


def test_daemon_restarts_never_count_as_failed_attempts(tmp_path):
    """Three daemons killed mid-job: the job is interrupted, not broken; it resumes, never fails."""
    layout = Layout(tmp_path / "h")
    layout.ensure()
    db = StateDB(layout.state_db)
    q = FsQueue(layout, db)
    write_jsonl(layout.inbox / "healthy.jsonl", text_records(1))
    q.accept(layout.inbox / "healthy.jsonl")
    for _ in range(5):                       # five starts, each killed mid-job
        q.claim_next()
        q.reconcile()
    job = db.by_name("healthy.jsonl")
    assert job.state == "pending" and job.resume and job.crashes == 0 and job.attempts == 5


def test_check_reports_staged_copies_nobody_queued(home):
    staged = home.path / "inbox/.big.jsonl.0a1b2c3d.part"
    staged.write_text('{"text": "x"}\n')
    os.utime(staged, (time.time() - 7200, time.time() - 7200))
    f = {x["check"]: x for x in json.loads(home.ctl("check", "--json").stdout)}
    assert f["staged uploads"]["level"] == "warning" and ".big.jsonl.0a1b2c3d.part" in f["staged uploads"]["detail"]
