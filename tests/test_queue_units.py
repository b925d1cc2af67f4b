"""The pieces under the queue's promise: transitions table, atomic writes, reconcile, log rotation."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

from core.atomic import atomic_write, atomic_write_json, read_json
from daemon.fsqueue import FsQueue
from daemon.intakefile import Intake
from core.logsetup import DailyFileHandler
from core.paths import Layout
from core.statedb import StateDB
from core.states import FOLDER_STATES, TRANSITIONS, JobState, Priority, TransitionError, check_transition
from daemon_helpers import text_records, write_jsonl


def test_transition_table_is_enforced():
    check_transition(None, JobState.PENDING)
    check_transition(JobState.PENDING, JobState.PROCESSING)
    check_transition(JobState.PROCESSING, JobState.PENDING)       # interrupted -> requeued
    check_transition(JobState.FAILED, JobState.PENDING)           # retry
    with pytest.raises(TransitionError, match="from done to pending"):
        check_transition(JobState.DONE, JobState.PENDING)
    with pytest.raises(TransitionError):
        check_transition(JobState.PENDING, JobState.DONE)          # never trained
    assert TRANSITIONS[JobState.DONE] == frozenset({JobState.MISSING})
    # "missing" (the file vanished behind trainerd's back) is in the table, reachable from every
    # folder state and left by nothing; it has no folder
    for state in FOLDER_STATES:
        check_transition(state, JobState.MISSING)
    assert TRANSITIONS[JobState.MISSING] == frozenset()
    with pytest.raises(TransitionError, match="from missing to pending"):
        check_transition(JobState.MISSING, JobState.PENDING)
    assert set(TRANSITIONS) == set(JobState)
    assert JobState.MISSING not in FOLDER_STATES
    with pytest.raises(ValueError):
        JobState.MISSING.folder


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "s.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert read_json(p) == {"a": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["s.json"]


def test_failed_atomic_write_keeps_old_file(tmp_path):
    """EFBIG mid-write (RLIMIT_FSIZE): the old content survives, no temp file is left."""
    p = tmp_path / "s.json"
    atomic_write(p, "old\n")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        from core.atomic import atomic_write
        try:
            atomic_write(__import__("pathlib").Path({str(p)!r}), "x" * 100000)
        except OSError as e:
            print("error", e.errno); sys.exit(0)
        sys.exit(1)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "error" in r.stdout, r.stderr
    assert p.read_text() == "old\n"
    assert [x.name for x in tmp_path.iterdir()] == ["s.json"]


def _queue(tmp_path):
    layout = Layout(tmp_path / "h")
    layout.ensure()
    return layout, StateDB(layout.state_db)


def test_reconcile_adopts_unknown_files_and_requeues_processing(tmp_path):
    layout, db = _queue(tmp_path)
    q = FsQueue(layout, db)
    write_jsonl(layout.inbox / "a.jsonl", text_records(2, "a"))
    job = q.accept(layout.inbox / "a.jsonl")
    q.claim_next()
    # a crash right after a rename, before the row was written:
    write_jsonl(layout.state_dir(JobState.PENDING) / "orphan.jsonl", text_records(1, "o"))
    write_jsonl(layout.state_dir(JobState.FAILED) / "lost.jsonl", text_records(1, "l"))
    fixes = q.reconcile()
    assert any("adopted pending/orphan.jsonl" in f for f in fixes)
    assert any("a.jsonl: interrupted in processing/" in f for f in fixes)
    assert (layout.state_dir(JobState.FAILED) / "lost.jsonl.error.json").exists()
    a = db.get(job.id)
    assert a.state == "pending" and a.resume
    assert db.next_pending().name == "a.jsonl"       # interrupted job first
    assert db.by_name("orphan.jsonl").sha256 is not None
    assert q.reconcile() == []                        # idempotent


def test_reconcile_repairs_stale_rows_and_reports_vanished_files(tmp_path):
    layout, db = _queue(tmp_path)
    q = FsQueue(layout, db)
    for n in ("a", "b"):
        write_jsonl(layout.inbox / f"{n}.jsonl", text_records(1, n))
        q.accept(layout.inbox / f"{n}.jsonl")
    os.rename(layout.state_dir(JobState.PENDING) / "a.jsonl", layout.state_dir(JobState.DONE) / "a.jsonl")
    os.unlink(layout.state_dir(JobState.PENDING) / "b.jsonl")     # someone deleted it by hand
    fixes = q.reconcile()
    assert any("state.db said pending, file is in done/" in f for f in fixes)
    assert any("b.jsonl: recorded as pending but not found" in f for f in fixes)
    assert db.by_name("a.jsonl").state == "done" and db.by_name("b.jsonl").state == "missing"


def test_accept_records_priority_and_events(tmp_path):
    layout, db = _queue(tmp_path)
    q = FsQueue(layout, db)
    write_jsonl(layout.inbox / "x.jsonl", text_records(3))
    job = q.accept(layout.inbox / "x.jsonl", Intake(priority=Priority.HIGH))
    assert job.priority == "high" and job.records == 3 and job.format == "text"
    assert [e["kind"] for e in db.events()] == ["accepted"]


def test_each_end_of_a_job_is_counted_once_and_counts_never_go_down(tmp_path):
    """state.db's counters (what /metrics exposes as trainer_jobs_finished_total{outcome}) are
    added to in the transaction that moves the job: a retry does not take an end back."""
    layout, db = _queue(tmp_path)
    q = FsQueue(layout, db)

    def finished() -> dict[str, float]:
        return {labels["outcome"]: v for name, labels, v in db.counters() if name == "trainer_jobs_finished"}

    for name, tag in (("a.jsonl", "a"), ("b.jsonl", "b"), ("c.jsonl", "c"), ("d.jsonl", "d")):
        write_jsonl(layout.inbox / name, text_records(2, tag))
        q.accept(layout.inbox / name)
    write_jsonl(layout.inbox / "a2.jsonl", text_records(2, "a"))            # same content as a.jsonl
    q.accept(layout.inbox / "a2.jsonl")
    (layout.inbox / "bad.jsonl").write_text("not json\n")
    q.accept(layout.inbox / "bad.jsonl")
    assert finished() == {"duplicate": 1, "rejected": 1}
    a = q.move(q.claim_next(), JobState.DONE)
    b = q.move(q.claim_next(), JobState.FAILED, error="boom")
    q.remove("c.jsonl")
    os.unlink(q.path(JobState.PENDING, "d.jsonl"))                           # behind trainerd's back
    assert q.claim_next() is None
    assert a.name == "a.jsonl" and b.name == "b.jsonl"
    assert finished() == {"duplicate": 1, "rejected": 1, "done": 1, "failed": 1, "removed": 1, "missing": 1}
    job = q.retry("b.jsonl")                                                 # failed -> pending
    assert finished()["failed"] == 1
    q.move(q.move(job, JobState.PROCESSING), JobState.FAILED, error="skipped", outcome="skipped")
    assert finished() == {"duplicate": 1, "rejected": 1, "done": 1, "failed": 1, "removed": 1, "missing": 1,
                          "skipped": 1}
    db.close()


def test_daily_log_file_switches_with_the_date(tmp_path):
    class Clock(DailyFileHandler):
        day = "20261123"

        def _today(self) -> str:
            return self.day

    h = Clock(tmp_path)
    h.setFormatter(logging.Formatter("%(message)s"))
    rec = lambda m: logging.LogRecord("t", logging.INFO, "", 0, m, None, None)  # noqa: E731
    h.emit(rec("monday"))
    Clock.day = "20261124"
    h.emit(rec("tuesday"))
    h.close()
    assert (tmp_path / "daemon_20261123.log").read_text() == "monday\n"
    assert (tmp_path / "daemon_20261124.log").read_text() == "tuesday\n"
