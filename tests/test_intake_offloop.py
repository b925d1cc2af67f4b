"""A big inbox file is hashed and validated off the daemon's loop: control and status go on.

No mock: the file is simply big (about 120 MB of valid JSONL, some seconds of sha256 and
validation). While it is being checked, the status file says so (``checking``) and control
requests are answered within a second; a stop meanwhile leaves it in inbox/, taken once at the
next start; ``run(burst=True)`` waits for a check under way.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from daemon import control as ctl
from core.atomic import sha256_file
from daemon.fsqueue import FsQueue
from daemon.intakefile import FileChanged, check_file
from daemon.main import Daemon
from core.paths import Layout
from core.statedb import StateDB
from daemon_helpers import STANDIN, alive, text_records, wait_for, write_jsonl

BIG_MB = 120


def make_big(path: Path, mb: int = BIG_MB) -> Path:
    """About *mb* MB of valid, distinct-content JSONL, written fast (one block repeated)."""
    line = (json.dumps({"text": f"{path.name} " + "x" * 200}) + "\n").encode()
    block = line * 4096
    with open(path, "wb") as fh:
        for _ in range(mb * 1024 * 1024 // len(block) + 1):
            fh.write(block)
    return path


def round_trip(layout: Layout, command: str) -> tuple[dict, float]:
    """Send a control request the way trainer-ctl does; (reply, seconds until it came)."""
    t0 = time.monotonic()
    req = ctl.write_request(layout, command, source="test")
    reply = ctl.wait_reply(layout, req, timeout=10.0)
    assert reply is not None, f"{command}: no reply within 10 s"
    return reply, time.monotonic() - t0


def checking(home) -> dict | None:
    return home.status().get("checking")


def test_control_and_status_answered_while_a_big_file_is_checked(home, tmp_path):
    home.launch()
    layout = Layout(home.path)
    big = make_big(tmp_path / "big.jsonl")
    size = big.stat().st_size
    os.rename(big, home.path / "inbox/big.jsonl")
    wait_for(lambda: (checking(home) or {}).get("file") == "big.jsonl", timeout=10, what="checking")
    assert checking(home)["bytes"] == size and checking(home)["since"]
    for command in ("pause", "resume", "pause"):
        reply, took = round_trip(layout, command)
        assert reply["ok"], reply
        print(f"{command}: answered in {took:.3f} s while checking")
        assert took < 1.0, f"{command} answered after {took:.2f} s while a file was being checked"
    # the status written after the last command (at the next status write: status_interval_s)
    # still shows the check: answered during it
    wait_for(lambda: (home.status().get("last_command") or {}).get("command") == "pause"
             and home.status().get("paused") is True, timeout=5, what="the status after the last command")
    st = home.status()
    assert st["checking"]["file"] == "big.jsonl", "the check ended before the commands: make the file bigger"
    assert (home.path / "inbox/big.jsonl").exists()
    r = home.ctl("status", "--json")
    assert r.returncode == 0 and "checking" in json.loads(r.stdout)
    wait_for(lambda: home.files("pending") == ["big.jsonl"], timeout=60, what="big file queued")
    wait_for(lambda: "checking" in home.status() and checking(home) is None, what="checking cleared")
    assert os.listdir(home.path / "inbox") == []
    job = json.loads(home.ctl("queue", "list", "--json").stdout)[0]
    assert job["size"] == size and job["records"] > 500_000


def test_stop_while_checking_leaves_the_file_in_inbox_taken_once_at_next_start(home, tmp_path):
    home.launch()
    pid = home.pid()
    os.rename(make_big(tmp_path / "big.jsonl"), home.path / "inbox/big.jsonl")
    wait_for(lambda: (checking(home) or {}).get("file") == "big.jsonl", timeout=10, what="checking")
    t0 = time.monotonic()
    reply, took = round_trip(Layout(home.path), "stop")
    assert reply["ok"] and took < 1.0, (reply, took)
    wait_for(lambda: not alive(pid), timeout=15, what="daemon exit")
    assert time.monotonic() - t0 < 3, "the stop waited for the whole check"
    assert os.listdir(home.path / "inbox") == ["big.jsonl"]
    for state in ("pending", "processing", "done", "failed"):
        assert home.files(state) == [], state
    st = home.status()
    assert st["status"] == "stopped" and st["checking"] is None
    # the next start takes it, once (paused first, so the stand-in does not train 600k records)
    home.launch()
    reply, _ = round_trip(Layout(home.path), "pause")
    assert reply["ok"]
    wait_for(lambda: home.files("pending") == ["big.jsonl"], timeout=60, what="queued after restart")
    jobs = json.loads(home.ctl("queue", "list", "--json").stdout)
    assert [j["name"] for j in jobs] == ["big.jsonl"]
    assert os.listdir(home.path / "inbox") == []


def test_burst_waits_for_the_check_under_way_and_drains(home, tmp_path):
    (home.path / "config.json").write_text(json.dumps({**STANDIN, "standin_step_seconds": 0,
                                                       "inbox_stable_seconds": 0}))
    inbox = home.path / "inbox"
    now = time.time()
    # few, long records: some MB to check, few steps to train
    (inbox / "a.jsonl").write_text("".join(json.dumps({"text": f"{i} " + "y" * 500_000}) + "\n"
                                           for i in range(60)))
    write_jsonl(inbox / "b.jsonl", text_records(3, "b"))
    (inbox / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": oops}\n')
    for i, name in enumerate(("a.jsonl", "b.jsonl", "c.jsonl")):
        os.utime(inbox / name, (now - 100 + i, now - 100 + i))
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:       # what the status file says while the burst runs
        while not done.is_set():
            try:
                c = json.loads((home.path / "status/training_status.json").read_text()).get("checking")
            except (FileNotFoundError, ValueError):
                c = None
            if c:
                seen.add(c["file"])
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    d = Daemon(Layout(home.path))
    try:
        d.run(burst=True)
    finally:   # the in-process daemon wrote its pid (ours) there: the fixture must not kill us
        (home.path / ".daemon.pid").unlink(missing_ok=True)
        for s, h in handlers.items():
            signal.signal(s, h)
        done.set()
        watcher.join()
    assert home.files("done") == ["a.jsonl", "b.jsonl"] and home.files("failed") == ["c.jsonl"]
    assert os.listdir(inbox) == []
    assert d.check is None and d.board.state["checking"] is None
    assert "a.jsonl" in seen, seen


def test_accept_with_a_stale_check_moves_nothing(tmp_path):
    layout = Layout(tmp_path / "h")
    layout.ensure()
    db = StateDB(layout.state_db)
    try:
        q = FsQueue(layout, db, max_bad_record_fraction=0.01)
        src = write_jsonl(layout.inbox / "a.jsonl", text_records(3))
        checked = check_file(src, max_bad_record_fraction=0.01)
        with open(src, "a") as fh:                       # written to after the check
            fh.write(json.dumps({"text": "late"}) + "\n")
        with pytest.raises(FileChanged):
            q.accept(src, checked=checked)
        checked = check_file(src, max_bad_record_fraction=0.01)
        same_size = tmp_path / "other.jsonl"
        same_size.write_bytes(src.read_bytes().replace(b"late", b"LATE"))
        os.replace(same_size, src)                       # replaced by another file of the same size
        with pytest.raises(FileChanged):
            q.accept(src, checked=checked)
        assert src.exists() and db.jobs() == []
        checked = check_file(src, max_bad_record_fraction=0.01)
        job = q.accept(src, checked=checked)
        assert job.state == "pending" and job.records == 4
        assert job.sha256 == sha256_file(layout.inbox.parent / "queue/pending/a.jsonl")
    finally:
        db.close()
