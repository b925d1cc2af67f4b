"""No leftovers, bounded growth (issue 9 item 6), as the user lives it: a daemon SIGKILLed mid-job
leaves its job spec and half-written checkpoints, and the next start removes them; months of
datasets leave snapshots/, the events table and metrics.jsonl bounded; `trainer-ctl check` says
how big things are. Real daemons, real trainer-ctl, real files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from core.statedb import StateDB
from daemon_helpers import alive, text_records, wait_for, write_jsonl
from core.interface import JobSpec

MIB = 1 << 20


def _spec(home: Path, job_id: int, name: str, **config) -> dict:
    """A job spec as SubprocessTrainer writes it (JobSpec.to_json), for *home*."""
    return JobSpec(job_id=job_id, name=name, dataset=home / "queue/processing" / name, sha256="ab" * 32,
                   home=home, config={"trainer": "qlora", "learning_rate": 2e-4, **config}).to_json()


def _half_written_checkpoint(parent: Path, step: int, pid: int = 4242) -> Path:
    """What trainer/checkpoint.py leaves when killed inside a checkpoint write."""
    tmp = parent / f".tmp-step-{step}-{pid}"
    tmp.mkdir(parents=True)
    (tmp / "adapter.safetensors").write_bytes(os.urandom(4096))
    (tmp / "optimizer.pt").write_bytes(os.urandom(1024))          # no manifest.json yet
    return tmp


def _complete_checkpoint(parent: Path, step: int, size: int = 7) -> Path:
    d = parent / f"step-{step}"
    d.mkdir(parents=True)
    (d / "adapter.safetensors").write_bytes(b"\0" * size)
    return d


def _kill_daemon(home) -> None:
    pid = home.pid()
    assert pid and alive(pid)
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid) and not any(alive(int(c)) for c in children), timeout=20,
             what="daemon (and any worker) gone")


def _events(home) -> list[dict]:
    db = StateDB(home.path / "status/state.db", readonly=True)
    try:
        return [dict(r) for r in db.conn.execute("SELECT id, kind, job_id, message FROM events ORDER BY id")]
    finally:
        db.close()


# ---- leftovers of a killed daemon ----------------------------------------------------------------
def test_a_daemon_killed_mid_job_leaves_nothing_behind_after_the_next_start(home, tmp_path, monkeypatch):
    tmpdir = tmp_path / "systmp"                 # the daemon's $TMPDIR (where old releases put specs)
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    me = home.path.resolve()
    write_jsonl(home.path / "inbox/long.jsonl", text_records(80))
    home.launch()
    wait_for(lambda: (home.status().get("current_step") or 0) >= 3, what="training under way")
    _kill_daemon(home)
    assert home.files("processing") == ["long.jsonl"]

    # what a SIGKILL of a real (qlora) run leaves, next to what must survive the cleanup
    jobs = me / "status/jobs"
    jobs.mkdir(exist_ok=True)
    stale = jobs / "job-1-k3x_9qzt.json"
    stale.write_text(json.dumps(_spec(me, 1, "long.jsonl")))
    notes = jobs / "README.txt"                                  # not a job spec: not ours to remove
    notes.write_text("my notes")
    ck = me / "checkpoints/job-1"
    kept_ck = _complete_checkpoint(ck, 2)
    half = _half_written_checkpoint(ck, 4)
    half_aside = _half_written_checkpoint(me / "checkpoints/set-aside/job-7", 6, pid=777)
    kept_aside = _complete_checkpoint(me / "checkpoints/set-aside/job-7", 4)
    outside = tmp_path / "elsewhere"                             # a symlinked .tmp-step is unlinked,
    outside.mkdir()                                              # its target never followed
    (outside / "precious.bin").write_bytes(b"keep me")
    (ck / ".tmp-step-5-99").symlink_to(outside, target_is_directory=True)
    deleting = me / "snapshots/.deleting-20240101_000000__old"   # a snapshot removal cut short
    deleting.mkdir(parents=True)
    (deleting / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    dead = subprocess.Popen(["true"])                            # a pid that no longer runs
    dead.wait()
    copy_killed = me / f"snapshots/.tmp-20240301_101500__long-{dead.pid}"   # worker killed mid-snapshot
    copy_killed.mkdir()
    (copy_killed / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    manual_killed = me / f"snapshots/.copy-manual-{dead.pid}-0"  # `trainer-ctl snapshot` killed
    manual_killed.mkdir()
    manual_live = me / f"snapshots/.copy-manual-{os.getpid()}-0"  # one copying right now
    manual_live.mkdir()
    legacy_mine = tmpdir / "job-3-abcd1234.json"                 # an older release's $TMPDIR spec
    legacy_mine.write_text(json.dumps(_spec(me, 3, "older.jsonl")))
    legacy_other = tmpdir / "job-3-efgh5678.json"                # another base dir's: left alone
    legacy_other.write_text(json.dumps(_spec(tmp_path / "other-home", 3, "x.jsonl")))
    not_a_spec = tmpdir / "job-3-zzzz9999.json"                  # unreadable: left alone
    not_a_spec.write_text("{truncated")

    home.launch()
    wait_for(lambda: home.files("done") == ["long.jsonl"], timeout=60, what="the job finished after restart")
    home.ctl("stop")
    wait_for(lambda: home.pid() is None, what="daemon stopped")

    for gone in (stale, half, half_aside, ck / ".tmp-step-5-99", deleting, legacy_mine, copy_killed,
                 manual_killed):
        assert not os.path.lexists(gone), f"{gone} was left behind"
    for kept in (notes, kept_ck, kept_aside, legacy_other, not_a_spec, outside / "precious.bin", manual_live):
        assert kept.exists(), f"{kept} was removed"
    assert list(jobs.iterdir()) == [notes]
    log = home.log_text()
    assert "start-up cleanup: removed stale job spec status/jobs/job-1-k3x_9qzt.json" in log
    assert f"start-up cleanup: removed stale job spec {legacy_mine}" in log
    assert "start-up cleanup: removed unfinished checkpoint checkpoints/job-1/.tmp-step-4-4242" in log
    assert "start-up cleanup: removed unfinished checkpoint checkpoints/set-aside/job-7/.tmp-step-6-777" in log
    assert "start-up cleanup: finished removing snapshots/.deleting-20240101_000000__old" in log
    assert f"start-up cleanup: removed unfinished snapshot copy snapshots/{copy_killed.name}" in log


def test_a_second_start_while_the_daemon_runs_cleans_nothing(home):
    """A second launch while the daemon runs must not clean anything (it never gets the lock)."""
    write_jsonl(home.path / "inbox/long.jsonl", text_records(200))
    home.launch()
    wait_for(lambda: (home.status().get("current_step") or 0) >= 1, what="training under way")
    live = home.path / "status/jobs/job-1-live1234.json"    # stands for the running attempt's spec
    live.parent.mkdir(exist_ok=True)
    live.write_text(json.dumps(_spec(home.path.resolve(), 1, "long.jsonl")))
    half = _half_written_checkpoint(home.path / "checkpoints/job-1", 8)   # the worker writing it now
    r = home.burst()
    assert r.returncode == 1 and "already running" in r.stderr, r.stderr
    assert live.exists() and half.exists()
    home.ctl("stop")


# ---- snapshots -----------------------------------------------------------------------------------
def _snapshot(snaps: Path, name: str, created: datetime | None, size: int = 256, **meta) -> Path:
    d = snaps / name
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"\0" * size)
    body = {"job_id": 1, "dataset": name, **meta}
    if created is not None:
        body["created_at"] = created.isoformat()
    (d / "snapshot.json").write_text(json.dumps(body))
    return d


def test_sixty_snapshots_keep_the_newest_fifty_and_every_consolidation_or_manual_one(home):
    snaps = home.path / "snapshots"
    t0 = datetime(2024, 3, 1, tzinfo=timezone.utc)
    at = [t0 + timedelta(hours=i) for i in range(60)]
    plain = {i: _snapshot(snaps, f"{at[i]:%Y%m%d_%H%M%S}__data-{i:02d}", at[i]) for i in range(60)}
    # among the oldest ten, ones that must stay whatever their age (each replaces a plain one)
    for i in range(7):
        shutil.rmtree(plain.pop(i))
    protected = {
        "manual": _snapshot(snaps, f"{at[0]:%Y%m%d_%H%M%S}__manual", at[0], kind="manual",
                            description="before the big run"),
        "backup": _snapshot(snaps, f"{at[1]:%Y%m%d_%H%M%S}__pre-consolidation", at[1],
                            kind="pre-consolidation", consolidated_into="consolidated_models/c1"),
        "backup-no-meta-yet": snaps / f"{at[2]:%Y%m%d_%H%M%S}__pre-consolidation-2",
        "unreadable": snaps / f"{at[3]:%Y%m%d_%H%M%S}__data-03",
        "named-by-consolidation": _snapshot(snaps, f"{at[4]:%Y%m%d_%H%M%S}__data-04", at[4]),
        "kind-manual-renamed": _snapshot(snaps, f"{at[5]:%Y%m%d_%H%M%S}__kept-by-hand", at[5], kind="manual"),
        "consolidated_into": _snapshot(snaps, f"{at[6]:%Y%m%d_%H%M%S}__data-06", at[6],
                                       consolidated_into="consolidated_models/c0"),
    }
    protected["backup-no-meta-yet"].mkdir()                       # renamed, snapshot.json not yet written
    (protected["backup-no-meta-yet"] / "adapter_model.safetensors").write_bytes(b"w")
    protected["unreadable"].mkdir()
    (protected["unreadable"] / "snapshot.json").write_text("{half a json")
    for i, key in ((2, "backup-no-meta-yet"), (3, "unreadable")):   # no date inside: the mtime counts
        os.utime(protected[key], (at[i].timestamp(), at[i].timestamp()))
    c1 = home.path / "consolidated_models/c1"
    c1.mkdir(parents=True)
    (c1 / "consolidation.json").write_text(json.dumps(
        {"kind": "consolidation", "adapters": [{"path": str(protected["named-by-consolidation"])}]}))
    # ordered by created_at, not by name: the newest-named folder is in fact the oldest
    misdated = _snapshot(snaps, "29991231_235959__misdated", t0 - timedelta(days=30))
    # no created_at: the folder's mtime says how old it is
    undated = _snapshot(snaps, f"{at[30]:%Y%m%d_%H%M%S}__undated", None)
    os.utime(undated, (t0.timestamp() - 86400, t0.timestamp() - 86400))
    half_removed = snaps / ".deleting-20240101_000000__gone"      # a removal cut short last time
    half_removed.mkdir()
    (half_removed / "adapter_model.safetensors").write_bytes(b"w")
    before = {p.name for p in snaps.iterdir() if not p.name.startswith(".")}
    assert len(before) == 62

    write_jsonl(home.path / "inbox/today.jsonl", text_records(3))
    r = home.burst()                              # default keep_snapshots (50)
    assert r.returncode == 0, r.stderr

    after = {p.name for p in snaps.iterdir()}
    # the newest 50 of the 62 always stay; of the 12 oldest (misdated, undated, the 7 protected,
    # plain 7, 8, 9) the protected stay and the other five go
    oldest_plain = sorted(plain)[:3]
    gone = {misdated.name, undated.name} | {plain[i].name for i in oldest_plain}
    assert after == before - gone, (sorted(before - after), sorted(gone))
    assert all(p.exists() for p in protected.values())
    assert not half_removed.exists() and not any(p.name.startswith(".deleting-") for p in snaps.iterdir())
    log = home.log_text()
    for name in gone:
        assert f"retention: removed snapshot snapshots/{name} (keep_snapshots 50)" in log

    # a second job with nothing new to prune removes nothing more
    write_jsonl(home.path / "inbox/tomorrow.jsonl", text_records(2))
    assert home.burst().returncode == 0
    assert {p.name for p in snaps.iterdir()} == after


def test_held_candidates_are_counted_apart(tmp_path):
    """Adapters the promotion gate held back never push a published one out; the newest
    keep_snapshots of them wait for `trainer-ctl promote`."""
    from core.paths import Layout
    from daemon.retention import prune_snapshots

    layout = Layout(tmp_path)
    t0 = datetime(2024, 3, 1, tzinfo=timezone.utc)
    published = [_snapshot(layout.snapshots, f"p{i}", t0 + timedelta(hours=2 * i)) for i in range(4)]
    held = [_snapshot(layout.snapshots, f"h{i}__held", t0 + timedelta(hours=2 * i + 1), kind="held")
            for i in range(5)]
    out = prune_snapshots(layout, 3)
    left = sorted(p.name for p in layout.snapshots.iterdir())
    assert left == ["h2__held", "h3__held", "h4__held", "p1", "p2", "p3"], left
    assert sum("removed held snapshot" in m for m in out) == 2 and len(out) == 3
    assert not published[0].exists() and not held[0].exists()


def test_keep_snapshots_lowered_prunes_after_the_next_job(home):
    snaps = home.path / "snapshots"
    t0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
    made = [_snapshot(snaps, f"{t0 + timedelta(minutes=i):%Y%m%d_%H%M%S}__d{i}", t0 + timedelta(minutes=i))
            for i in range(8)]
    home.write_config(keep_snapshots=3)
    write_jsonl(home.path / "inbox/a.jsonl", text_records(2))
    assert home.burst().returncode == 0
    assert sorted(p.name for p in snaps.iterdir()) == [p.name for p in made[-3:]]
    home.write_config(keep_snapshots=0)
    r = home.ctl("check", "--json")
    f = {x["check"]: x for x in json.loads(r.stdout)}
    assert f["config"]["level"] == "problem" and "keep_snapshots" in f["config"]["detail"]


# ---- events --------------------------------------------------------------------------------------
def test_events_are_pruned_to_keep_events_after_a_job(home):
    write_jsonl(home.path / "inbox/first.jsonl", text_records(2, "first"))
    assert home.burst().returncode == 0                  # creates state.db with a real history
    db = StateDB(home.path / "status/state.db")
    try:
        for i in range(300):                             # months of history
            db.add_event("note", f"old event {i}")
    finally:
        db.close()
    home.write_config(keep_events=100)
    write_jsonl(home.path / "inbox/second.jsonl", text_records(2, "second"))
    assert home.burst().returncode == 0
    ev = _events(home)
    ids = [e["id"] for e in ev]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "the newest events, without holes"
    completed = next(e for e in ev if e["kind"] == "completed" and "second.jsonl" in e["message"])
    # pruned right after the job ended: the 100 newest then, then what the shutdown added
    assert len([i for i in ids if i <= completed["id"]]) == 100
    assert [e["kind"] for e in ev if e["id"] > completed["id"]] == ["daemon_stop"]
    assert not any(e["message"] == "old event 0" for e in ev)
    assert "retention: removed" in home.log_text() and "(keep_events 100)" in home.log_text()
    home.write_config(keep_events=99)                    # a minimum keeps a useful history
    f = {x["check"]: x for x in json.loads(home.ctl("check", "--json").stdout)}
    assert f["config"]["level"] == "problem" and "keep_events" in f["config"]["detail"]


def test_events_are_pruned_at_start_even_with_no_job(home):
    home.write_config(keep_events=100)
    assert home.burst().returncode == 0                  # nothing to train
    db = StateDB(home.path / "status/state.db")
    try:
        for i in range(300):                             # rejected files, pauses, restarts...
            db.add_event("note", f"old event {i}")
    finally:
        db.close()
    assert home.burst().returncode == 0
    ev = _events(home)
    # pruned right after this start was recorded: its 100 newest, then the stop
    assert len(ev) == 101 and [e["kind"] for e in ev[-2:]] == ["daemon_start", "daemon_stop"]
    assert ev[0]["message"] == "old event 201"
    assert "start-up cleanup: removed" in home.log_text()


def test_set_aside_checkpoints_of_old_failed_jobs_go_after_a_job(home):
    aside = home.path / "checkpoints/set-aside"
    now = datetime.now().timestamp()
    for k in range(1, 7):                    # job-6 set aside last; job-1 first
        step = aside / f"job-{k}" / "step-4"
        step.mkdir(parents=True)
        (step / "adapter.safetensors").write_bytes(b"w" * 1000)
        os.utime(aside / f"job-{k}", (now - 100 + k, now - 100 + k))
    (aside / ".deleting-job-0").mkdir()      # a removal a crash interrupted
    home.write_config(keep_set_aside=4)
    write_jsonl(home.path / "inbox/a.jsonl", text_records(2, "a"))
    assert home.burst().returncode == 0 and home.files("done") == ["a.jsonl"]
    assert sorted(p.name for p in aside.iterdir()) == ["job-3", "job-4", "job-5", "job-6"]
    assert (aside / "job-6/step-4/adapter.safetensors").read_bytes() == b"w" * 1000
    text = home.log_text()
    assert "removed set-aside checkpoints checkpoints/set-aside/job-1 (keep_set_aside 4)" in text
    assert "finished removing checkpoints/set-aside/.deleting-job-0" in text


# ---- metrics.jsonl through a real daemon ---------------------------------------------------------
def test_metrics_rotate_by_size_and_keep_a_bounded_number_of_files(home):
    max_mb, keep = 0.01, 2                               # 10 KiB per file
    home.write_config(metrics_max_mb=max_mb, metrics_keep_files=keep, standin_step_seconds=0.005)
    # ~220 bytes a step record: ~46 a file, 200 in all, so the oldest are rotated out
    write_jsonl(home.path / "inbox/a.jsonl", text_records(100, "a"))
    write_jsonl(home.path / "inbox/b.jsonl", text_records(100, "b"))
    r = home.burst()
    assert r.returncode == 0, r.stderr
    status = home.path / "status"
    files = sorted(p.name for p in status.glob("metrics.jsonl*"))
    assert files == ["metrics.jsonl", "metrics.jsonl.1", "metrics.jsonl.2"], files
    history = []
    for name in ("metrics.jsonl.2", "metrics.jsonl.1", "metrics.jsonl"):
        data = (status / name).read_bytes()
        assert data.endswith(b"\n") and len(data) <= max_mb * (1 << 20), (name, len(data))
        history += [json.loads(line) for line in data.splitlines()]      # every line whole JSON
    steps = [(m["job_id"], m["step"]) for m in history if m.get("event") == "step"]
    # the newest records, in order, ending with the last step of the second job
    everything = [(1, i) for i in range(1, 101)] + [(2, i) for i in range(1, 101)]
    assert 90 < len(steps) < 150 and steps == everything[-len(steps):]
    assert "rotated metrics.jsonl" in home.log_text()

    # the next start appends to the current file (and rotates it when due): nothing is lost
    def history() -> bytes:
        return b"".join((status / n).read_bytes() for n in ("metrics.jsonl.2", "metrics.jsonl.1", "metrics.jsonl")
                        if (status / n).exists())
    cur = (status / "metrics.jsonl").read_bytes()
    write_jsonl(home.path / "inbox/c.jsonl", text_records(2, "c"))
    assert home.burst().returncode == 0
    after = history()
    assert after.count(cur) == 1
    tail = [json.loads(line) for line in after[after.index(cur) + len(cur):].splitlines()]
    assert [(m["job_id"], m["step"]) for m in tail] == [(3, 1), (3, 2)]


# ---- trainer-ctl check ---------------------------------------------------------------------------
def test_check_reports_what_grows_against_its_retention_setting(home):
    home.write_config(metrics_max_mb=0.01, metrics_keep_files=1, standin_step_seconds=0.005)
    write_jsonl(home.path / "inbox/a.jsonl", text_records(80))     # ~17 KiB of step records
    assert home.burst().returncode == 0
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    for i in range(4):
        _snapshot(home.path / "snapshots", f"2024010{i + 1}_000000__s{i}", t0 + timedelta(days=i), size=MIB)
    _complete_checkpoint(home.path / "checkpoints/job-9", 2, size=2 * MIB)
    _complete_checkpoint(home.path / "checkpoints/set-aside/job-4", 6, size=3 * MIB)

    def sizes():
        r = home.ctl("check", "--json")
        return {f["check"]: f for f in json.loads(r.stdout)}["sizes"]

    f = sizes()
    detail = f["detail"]
    assert f["level"] == "ok", detail
    mfiles = list((home.path / "status").glob("metrics.jsonl*"))
    assert len(mfiles) == 2
    msize = sum(p.stat().st_size for p in mfiles)
    assert "snapshots/ 4 (4.0 MiB; keep_snapshots 50" in detail
    assert "checkpoints/ 1 job(s) 2.0 MiB, set aside (failed/skipped, kept for a retry) 1 job(s) 3.0 MiB" in detail
    assert f"metrics.jsonl 2 file(s) {msize / MIB:.1f} MiB" in detail and "metrics_max_mb 0.01 x 1 + 1" in detail
    assert "state.db " in detail and "keep_events 100000" in detail
    db_mib = sum(p.stat().st_size for p in (home.path / "status").glob("state.db*") if p.name in
                 ("state.db", "state.db-wal")) / (1 << 20)
    assert f"state.db {db_mib:.1f} MiB" in detail

    # rotated files piling up beyond the setting (e.g. an older release's): a warning
    for n in range(2, 8):
        (home.path / f"status/metrics.jsonl.{n}").write_text(json.dumps({"step": n}) + "\n" + "z" * 9000 + "\n")
    table = home.ctl("check").stdout.splitlines()
    (line,) = [x for x in table if " sizes " in x]
    assert line.startswith("WARN  sizes") and "metrics.jsonl 8 file(s)" in line, line


# ---- the real worker: its job spec under status/jobs --------------------------------------------
@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory) -> Path:
    from trainer.tiny_base import build_tiny_base
    return build_tiny_base(tmp_path_factory.mktemp("bases") / "tiny")


@pytest.mark.slow
def test_real_worker_job_spec_left_by_a_sigkill_is_removed_at_the_next_start(home, tiny_base_dir, tmp_path,
                                                                              monkeypatch):
    tmpdir = tmp_path / "systmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    home.write_config(trainer="qlora", base_model=str(tiny_base_dir), max_length=64, batch_size=2,
                      gradient_accumulation=1, checkpoint_every_steps=1000, eval_fraction=0.0,
                      worker_timeout_s=120)
    write_jsonl(home.path / "inbox/real.jsonl", text_records(400, "real"))
    jobs = home.path / "status/jobs"
    home.launch()
    (spec,) = wait_for(lambda: list(jobs.glob("job-1-*.json")), timeout=60, what="the attempt's job spec")
    body = json.loads(spec.read_text())
    assert body["job_id"] == 1 and body["home"] == str(home.path.resolve()) and body["config"]["trainer"] == "qlora"
    wait_for(lambda: subprocess.run(["pgrep", "-P", str(home.pid())], capture_output=True).stdout,
             what="the worker running")
    _kill_daemon(home)
    assert spec.exists(), "a SIGKILLed daemon leaves its attempt's spec"
    assert not list(tmpdir.iterdir()), "nothing goes to $TMPDIR any more"

    home.launch()
    wait_for(lambda: f"removed stale job spec status/jobs/{spec.name}" in home.log_text(), what="start-up cleanup")
    (again,) = wait_for(lambda: list(jobs.glob("job-1-*.json")), timeout=60, what="the new attempt's spec")
    assert again.name != spec.name and not spec.exists()
    home.ctl("stop")
    wait_for(lambda: home.pid() is None, timeout=120, what="graceful stop")
    assert list(jobs.iterdir()) == [], "an attempt that ends removes its own spec"
    assert home.files("processing") == ["real.jsonl"]


def test_a_consolidation_in_progress_keeps_the_snapshot_its_journal_names(tmp_path):
    """While `trainer-ctl consolidate` runs, its journal (status/consolidation.json) names the
    backup it is moving current_model/ to: pruning then (after a job) must leave it."""
    from daemon import retention
    from core.paths import Layout

    layout = Layout(tmp_path / "h")
    layout.ensure()
    t0 = datetime(2024, 6, 1, tzinfo=timezone.utc)
    made = [_snapshot(layout.snapshots, f"{t0 + timedelta(hours=i):%Y%m%d_%H%M%S}__d{i}", t0 + timedelta(hours=i))
            for i in range(6)]
    (layout.status_dir / "consolidation.json").write_text(json.dumps(
        {"stage": "switching", "new_base": "consolidated_models/20240601_120000",
         "backup": f"snapshots/{made[1].name}", "description": "weekly"}))
    removed = retention.prune_snapshots(layout, 2)
    assert sorted(p.name for p in layout.snapshots.iterdir()) == sorted(p.name for p in (made[1], *made[-2:]))
    assert len(removed) == 3


def test_token_caches_go_with_their_jobs(home):
    """A done file's tokenized copy goes; a failed file's stays (a retry reads it), complete or
    half-built; an unknown file's goes (at start-up and after each job)."""
    import hashlib

    write_jsonl(home.path / "inbox/a.jsonl", text_records(2, "a"))
    write_jsonl(home.path / "inbox/bad.jsonl", [{"nothing": 1}])                # fails at intake
    sha = {n: hashlib.sha256((home.path / "inbox" / n).read_bytes()).hexdigest()[:16] for n in ("a.jsonl", "bad.jsonl")}
    assert home.burst().returncode == 0                  # the stand-in trains a.jsonl to done/
    assert home.files("done") == ["a.jsonl"] and home.files("failed") == ["bad.jsonl"]
    root = home.path / "cache" / "tokens"
    made = [root / f"{sha['a.jsonl']}-0123456789abcdef", root / f".partial-{sha['bad.jsonl']}-0123456789abcdef",
            root / f"{sha['bad.jsonl']}-fedcba9876543210", root / "feedfacefeedface-0123456789abcdef",
            root / ".partial-feedfacefeedface-0000000000000000"]
    for d in made:
        d.mkdir(parents=True)
        (d / "ids.i32").write_bytes(b"\0" * 64)
    write_jsonl(home.path / "inbox/b.jsonl", text_records(2, "b"))
    assert home.burst().returncode == 0
    assert sorted(p.name for p in root.iterdir()) == sorted([made[1].name, made[2].name])
    assert "removed token cache cache/tokens/feedfacefeedface" in home.log_text()
