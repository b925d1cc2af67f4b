"""Every job's data report: the worker's ``started`` event carries it (``dataset``), the daemon
stores it in state.db (jobs.data_report, replaced by every attempt), and `trainer-ctl queue list
--json` / `queue show` report it. Both shapes are accepted: the newer one with ``reasons`` (each a
count and the first line numbers) and the older flat one (counters only)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from daemon_helpers import STANDIN, text_records, write_jsonl
from daemon.main import Daemon
from core.paths import Layout
from core.statedb import StateDB, normalize_data_report
from core.interface import JobResult, Outcome
from daemon.standin import StandInTrainer

NEW = {"format": "messages", "truncation": "keep_answer", "max_length": 512,
       "records": 1000, "examples": 1010, "tokens": 491000, "trained_tokens": 250000, "tokens_cut": 1234,
       "reasons": {"truncated": {"count": 12, "lines": [4, 9], "tokens_cut": 1234},
                   "dropped": {"count": 1, "lines": [77]},
                   "no_user_turn": {"count": 2, "lines": [5, 6]},
                   "duplicate": {"count": 3, "lines": [10, 11, 12], "message": "same as an earlier record"},
                   "<img src=x onerror=alert(1)>": {"count": 1, "lines": [3]}},
       "some_future_key": "kept"}
FLAT = {"format": "text", "records": 3, "examples": 3, "truncated": 1, "dropped_too_long": 0,
        "dropped_empty": 0, "tokens": 42, "trained_tokens": 30, "skipped_invalid": 2}
FIRST_ATTEMPT = {"format": "messages", "records": 1, "examples": 1, "tokens": 7, "trained_tokens": 3,
                 "reasons": {"stale": {"count": 1, "lines": [1]}}}


class ReportingStandIn(StandInTrainer):
    """The real stand-in trainer; its ``started`` event carries the data report chosen per file.
    ``twice.jsonl`` is stopped by the trainer after its first start (so it runs a second attempt)."""
    reports: dict[str, list[Any]] = {}
    starts: dict[str, int] = {}

    def run(self, job, sink, control):
        name = Path(job.dataset).name
        n = ReportingStandIn.starts[name] = ReportingStandIn.starts.get(name, 0) + 1
        plan = ReportingStandIn.reports.get(name) or [None]
        report = plan[min(n, len(plan)) - 1]

        class WithReport:
            def emit(self, ev: dict[str, Any]) -> None:
                if ev.get("event") == "started" and report is not None:
                    ev = {**ev, "dataset": report}
                sink.emit(ev)
        if name == "twice.jsonl" and n == 1:
            WithReport().emit({"event": "started", "total_steps": 1, "resumed_from_step": 0})
            return JobResult(Outcome.STOPPED, "stopped by the worker", steps=0)
        return super().run(job, WithReport(), control)


def _burst(home) -> Daemon:
    (home.path / "config.json").write_text(json.dumps({**STANDIN, "standin_step_seconds": 0,
                                                       "inbox_stable_seconds": 0}))
    d = Daemon(Layout(home.path), trainer_factory=lambda c: ReportingStandIn(0))
    try:
        d.run(burst=True)
    finally:   # the in-process daemon wrote its pid (ours) there: the fixture must not kill us
        (home.path / ".daemon.pid").unlink(missing_ok=True)
    return d


@pytest.fixture
def trained(home):
    ReportingStandIn.reports = {"new.jsonl": [NEW], "flat.jsonl": [FLAT], "twice.jsonl": [FIRST_ATTEMPT, NEW]}
    ReportingStandIn.starts = {}
    for name in ("new.jsonl", "flat.jsonl", "twice.jsonl", "plain.jsonl"):
        write_jsonl(home.path / "inbox" / name, text_records(3, name))
    _burst(home)
    assert home.files("done") == ["flat.jsonl", "new.jsonl", "plain.jsonl", "twice.jsonl"]
    return home


def _raw(home, name: str) -> str | None:
    conn = sqlite3.connect(home.path / "status/state.db")
    try:
        return conn.execute("SELECT data_report FROM jobs WHERE name = ?", (name,)).fetchone()[0]
    finally:
        conn.close()


def test_the_data_report_is_stored_per_job_and_listed(trained) -> None:
    home = trained
    stored = json.loads(_raw(home, "new.jsonl"))
    assert stored == NEW                         # the new shape is kept as the worker sent it
    flat = json.loads(_raw(home, "flat.jsonl"))
    assert {k: flat[k] for k in FLAT} == FLAT    # the old shape too, with its counters as reasons
    assert flat["reasons"] == {"truncated": {"count": 1}, "skipped_invalid": {"count": 2}}
    # a second attempt replaces the first attempt's report
    assert ReportingStandIn.starts["twice.jsonl"] == 2
    assert json.loads(_raw(home, "twice.jsonl")) == NEW
    assert _raw(home, "plain.jsonl") is None     # the stand-in's own `started` has no report

    r = home.ctl("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    jobs = {j["name"]: j for j in json.loads(r.stdout)}
    assert jobs["new.jsonl"]["data_report"] == NEW
    assert jobs["flat.jsonl"]["data_report"]["reasons"]["skipped_invalid"] == {"count": 2}
    assert jobs["plain.jsonl"]["data_report"] is None
    assert jobs["twice.jsonl"]["attempts"] == 2 and jobs["twice.jsonl"]["data_report"] == NEW


def test_queue_show_prints_the_report_readably(trained) -> None:
    home = trained
    r = home.ctl("queue", "show", "new.jsonl")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("job ") and "new.jsonl (done)" in out.splitlines()[0]
    assert "data report (format messages, truncation keep_answer, max length 512):" in out
    for line in ("records:        1,000", "examples:       1,010", "tokens:         491,000",
                 "trained tokens: 250,000", "tokens cut:     1,234",
                 "truncated: 12 records (1,234 tokens cut), lines 4, 9, …",
                 "dropped: 1 record, line 77", "no_user_turn: 2 records, lines 5, 6",
                 "duplicate: 3 records, lines 10, 11, 12 — same as an earlier record",
                 "<img src=x onerror=alert(1)>: 1 record, line 3", "some future key: kept"):
        assert "  " + line in out.splitlines(), (line, out)

    flat = home.ctl("queue", "show", "flat.jsonl").stdout
    assert "  truncated: 1 record" in flat.splitlines() and "  skipped_invalid: 2 records" in flat.splitlines()
    assert "dropped_too_long" not in flat                 # a zero counter is no reason
    job_id = json.loads(home.ctl("queue", "show", "flat.jsonl", "--json").stdout)["id"]
    assert home.ctl("queue", "show", str(job_id)).stdout == flat      # by id too
    plain = home.ctl("queue", "show", "plain.jsonl").stdout
    assert "data report: none yet" in plain
    missing = home.ctl("queue", "show", "nope.jsonl")
    assert missing.returncode == 1 and "no job named 'nope.jsonl'" in missing.stderr


def test_queue_show_of_a_rejected_file_lists_its_bad_lines(home) -> None:
    lines = ['{"text": "ok"}', "{not json", '{"text": "ok"}', '{"text": 5}', "[1]"]
    (home.path / "inbox/bad.jsonl").write_text("\n".join(lines) + "\n")
    _burst(home)
    assert home.files("failed") == ["bad.jsonl"]
    r = home.ctl("queue", "show", "bad.jsonl")
    assert r.returncode == 0, r.stderr
    assert "intake validation: 2 of 5 records valid" in r.stdout
    assert ", line 2" in r.stdout and ", line 4" in r.stdout, r.stdout
    shown = json.loads(home.ctl("queue", "show", "bad.jsonl", "--json").stdout)
    assert shown["data_report"] is None and shown["validation"]["valid_records"] == 2


def test_on_event_ignores_a_started_without_a_report_object(home) -> None:
    write_jsonl(home.path / "inbox/a.jsonl", text_records(2))
    ReportingStandIn.reports = {"a.jsonl": ["not an object"]}
    ReportingStandIn.starts = {}
    _burst(home)
    assert home.files("done") == ["a.jsonl"] and _raw(home, "a.jsonl") is None
    d = Daemon(Layout(home.path))
    try:      # no job running: nothing to attach the report to, and no error
        d._on_event({"event": "started", "total_steps": 1, "dataset": NEW})
    finally:
        d.db.close()
    assert _raw(home, "a.jsonl") is None


def test_an_older_state_db_gains_the_column(tmp_path) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.executescript("""CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
        original_name TEXT NOT NULL, sha256 TEXT, size INTEGER, state TEXT NOT NULL,
        priority TEXT NOT NULL DEFAULT 'normal', seq INTEGER NOT NULL, resume INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0, forced INTEGER NOT NULL DEFAULT 0, duplicate_of INTEGER,
        error TEXT, format TEXT, records INTEGER, steps INTEGER, created_at REAL NOT NULL,
        updated_at REAL NOT NULL, started_at REAL, finished_at REAL);
        INSERT INTO jobs (name, original_name, state, seq, created_at, updated_at)
        VALUES ('old.jsonl', 'old.jsonl', 'done', 1, 0, 0);""")
    conn.close()
    ro = StateDB(path, readonly=True)          # a reader of the old file: no column, no report
    try:
        assert ro.by_name("old.jsonl").to_json()["data_report"] is None
    finally:
        ro.close()
    db = StateDB(path)
    try:
        job = db.by_name("old.jsonl")
        assert job.data_report is None and job.crashes == 0
        assert db.set_data_report(job.id, FLAT)
        assert db.get(job.id).to_json()["data_report"]["reasons"]["truncated"] == {"count": 1}
        assert not db.set_data_report(job.id, [1, 2])           # not an object: kept as it was
        assert db.get(job.id).report()["records"] == 3
        db.update(job.id, data_report="{broken")               # a damaged value reads as none
        assert db.get(job.id).to_json()["data_report"] is None
    finally:
        db.close()


def test_normalize_accepts_any_reason_shape() -> None:
    assert normalize_data_report(None) is None and normalize_data_report("x") is None
    r = normalize_data_report({"records": 2, "reasons": {"odd": 3, "fine": {"count": 1, "lines": [2]}}})
    assert r["reasons"] == {"odd": {"count": 3}, "fine": {"count": 1, "lines": [2]}}
    assert normalize_data_report({"records": 2, "examples": 2, "flag": True})["reasons"] == {}


@pytest.mark.slow
def test_a_real_tiny_training_run_reports_its_data(home, tmp_path) -> None:
    """The real QLoRA worker on the tiny base (a real daemon process in burst mode): its `started`
    event's report, in whichever shape this worker sends, reaches state.db, list and show."""
    from daemon.generator import generate_records
    from trainer.tiny_base import build_tiny_base

    base = build_tiny_base(tmp_path / "tiny")
    home.write_config(trainer="qlora", base_model=str(base), max_length=128, batch_size=2,
                      gradient_accumulation=1, learning_rate=2e-3, lr_scheduler="constant",
                      checkpoint_every_steps=50, eval_fraction=0.1, worker_timeout_s=120)
    write_jsonl(home.path / "inbox/arith.jsonl", generate_records(24, seed=5))
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert home.files("done") == ["arith.jsonl"], home.ctl("queue", "list").stdout
    stored = json.loads(_raw(home, "arith.jsonl"))
    assert stored["records"] == 24 and stored["examples"] >= 1
    assert stored["tokens"] >= stored["trained_tokens"] > 0
    assert isinstance(stored["reasons"], dict)
    (job,) = json.loads(home.ctl("queue", "list", "--json").stdout)
    assert job["data_report"] == stored
    out = home.ctl("queue", "show", "arith.jsonl").stdout
    assert "  records:        24" in out.splitlines() and "trained tokens:" in out, out


class LateReportStandIn(StandInTrainer):
    """Like the worker on a big file: a partial report at ``started``, the whole one later in a
    ``data_report`` event (once the background tokenizing ends)."""

    def run(self, job, sink, control):
        class Late:
            def emit(self, ev: dict[str, Any]) -> None:
                if ev.get("event") == "started":
                    sink.emit({**ev, "dataset": FIRST_ATTEMPT})
                    sink.emit({"event": "preparing", "phase": "tokenizing", "done": 5, "total": 9})
                    sink.emit({"event": "data_report", "dataset": NEW})
                    return
                sink.emit(ev)
        return super().run(job, Late(), control)


def test_the_whole_files_report_replaces_the_partial_one(home) -> None:
    write_jsonl(home.path / "inbox/big.jsonl", text_records(3))
    (home.path / "config.json").write_text(json.dumps({**STANDIN, "standin_step_seconds": 0,
                                                       "inbox_stable_seconds": 0}))
    d = Daemon(Layout(home.path), trainer_factory=lambda c: LateReportStandIn(0))
    try:
        d.run(burst=True)
    finally:
        (home.path / ".daemon.pid").unlink(missing_ok=True)
    assert home.files("done") == ["big.jsonl"]
    assert json.loads(_raw(home, "big.jsonl") or "null")["reasons"] == NEW["reasons"]
