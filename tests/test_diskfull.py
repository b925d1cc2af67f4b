"""The ENOSPC matrix (issue 9 item 4): a full disk pauses the daemon; it never crashes, strands,
loses, duplicates or loops, and it resumes by itself when space is back.

Every case runs the real daemon (launcher, trainer-ctl, the stand-in trainer or the real QLoRA
worker) in a base dir that lives entirely on a small real tmpfs. A filler file fills the disk
(written until ENOSPC) at the moment that makes the named write the one that fails; the test
freezes the daemon (SIGSTOP) while it fills when the daemon is busy, so that is deterministic,
and truncates state.db's WAL first where a commit must be the write that fails (a WAL that has
grown once is reused in place and would need no new space). Then space comes back:

- "once": the filler is deleted as soon as the pause is visible;
- "persistent": the disk stays full for a while (first with the daemon's released reserve still
  free, then with the filler topped up so that nothing at all is free), then it is deleted.

What must hold in every case: the daemon's pid stays alive with no traceback in its logs; the
status file and ``trainer-ctl status`` say ``paused: disk full (N MiB free in DIR)``; it resumes
by itself within a few ``disk_retry_interval_s``; the interrupted job goes on (from its
checkpoint with the real worker) with no crash counted; and every file ends in ``done/`` exactly
once (nothing in processing/, nothing lost or duplicated).

Needs root (mount). Each test prints one ``ENOSPC-MATRIX`` line (see ``-s`` or ``-rA``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from core.paths import Layout
from daemon_helpers import REPO, Home, alive, env_for, text_records, wait_for, write_jsonl
from daemon.generator import generate_records

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
DISK_MB = 32
RETRY_S = 0.3
DISK = {"min_free_disk_mb": 1, "disk_retry_interval_s": RETRY_S}
PAUSE_LINE = "training resumes by itself when space is back"     # daemon/main.py _enter_disk_full
BACK_LINE = "disk space is back"                                  # daemon/main.py _disk_recovered


# ---- the disk --------------------------------------------------------------------------------------
class Disk:
    """A mounted tmpfs and a filler file on it."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.filler = mnt / "filler"
        self.homes: list[Home] = []
        self.cleanups: list[Any] = []

    def free(self) -> int:
        st = os.statvfs(self.mnt)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> int:
        """Append to the filler until ENOSPC, then give *leave* bytes (whole pages) back.
        Returns the bytes free afterwards."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (b"\0" * MIB, b"\0" * PAGE):
                while True:
                    try:
                        os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
            if leave > 0:
                size = os.fstat(fd).st_size
                os.ftruncate(fd, max(0, size - -(-leave // PAGE) * PAGE))
        finally:
            os.close(fd)
        return self.free()

    def release(self) -> float:
        """Delete the filler; returns the monotonic time it happened."""
        self.filler.unlink(missing_ok=True)
        return time.monotonic()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk tests (needs root): {r.stderr.strip()}")
    d = Disk(mnt)
    try:
        yield d
    finally:
        for fn in reversed(d.cleanups):
            with contextlib.suppress(Exception):
                fn()
        for h in d.homes:
            pid = h.pid()
            h.kill_all()
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not pid or not alive(pid), timeout=10, what="daemon gone")
            with contextlib.suppress(OSError):     # kept (in tmp_path) to read after a failure
                shutil.copytree(h.path / "logs", tmp_path / "logs")
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def make_home(disk: Disk, **config: Any) -> Home:
    h = Home(disk.mnt / "home")
    Layout(h.path).ensure()
    h.write_config(**{**DISK, **config})
    disk.homes.append(h)
    return h


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP *pid* (all its threads) for the block: the disk fills while it cannot write."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def event_messages(h: Home, kind: str) -> list[str]:
    """The messages of state.db's events of *kind* (read-only, while the daemon runs)."""
    con = sqlite3.connect(f"file:{h.path / 'status/state.db'}?mode=ro", uri=True, timeout=5)
    try:
        return [m for (m,) in con.execute("SELECT message FROM events WHERE kind = ?", (kind,))]
    finally:
        con.close()


def truncate_wal(h: Home) -> None:
    """Checkpoint state.db and truncate its WAL to 0 bytes, so the next commit needs new space."""
    con = sqlite3.connect(h.path / "status/state.db", timeout=0.5)
    try:
        for _ in range(10):
            try:
                busy, _log, _done = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.OperationalError:       # locked
                busy = 1
            if busy == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("state.db stayed busy: the daemon was stopped inside a transaction")
    finally:
        con.close()
    wal = h.path / "status/state.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0


# ---- what the daemon shows ---------------------------------------------------------------------------
def pause_lines(h: Home) -> list[str]:
    return [l for l in h.log_text().splitlines() if PAUSE_LINE in l]


def wait_disk_paused(h: Home, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (h.status().get("paused_reason") or "").startswith("disk full (") and h.status(),
                    timeout=timeout, what="status paused: disk full")


def jobs(h: Home) -> list[dict[str, Any]]:
    r = h.ctl("queue", "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def inbox_files(h: Home) -> list[str]:
    return sorted(p.name for p in (h.path / "inbox").iterdir() if p.name.endswith(".jsonl"))


def assert_one_clear_line(r: subprocess.CompletedProcess, prog: str = "trainer-ctl") -> None:
    """A full disk: a non-zero exit and one line on stderr that says so, never a traceback."""
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and "disk full (" in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def assert_paused_everywhere(h: Home) -> None:
    st = h.status()
    assert st["paused"] is True and st["status"] == "paused", st
    assert st["paused_reason"].startswith("disk full (") and " MiB free in " in st["paused_reason"], st
    r = h.ctl("status")
    assert r.returncode == 0 and "trainerd: paused: disk full (" in r.stdout, r.stdout + r.stderr


def hold_full(h: Home, disk: Disk, pid: int, seconds: float = 2.0) -> None:
    """The "persistent" case: the disk stays full. First as the pause left it (the daemon's 4 MiB
    reserve released: it must not take that for space that is back and loop), then with the filler
    topped up so that nothing is free (trainer-ctl must still answer, the daemon must not die)."""
    before = pause_lines(h)
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        assert alive(pid)
        time.sleep(0.1)
    assert_paused_everywhere(h)
    assert pause_lines(h) == before, "the daemon resumed and paused again while the disk stayed full"
    assert BACK_LINE not in h.log_text()
    assert disk.fill() < PAGE                      # now really full
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        assert alive(pid)
        time.sleep(0.1)
    assert_paused_everywhere(h)                   # the status written when it paused
    assert_one_clear_line(h.ctl("pause"))         # no room even for a control request
    assert alive(pid)


def wait_recovered(h: Home, t_freed: float, timeout: float = 30) -> float:
    """Seconds from freeing the disk to the daemon's "disk space is back"."""
    wait_for(lambda: BACK_LINE in h.log_text(), timeout=timeout, what="disk space is back")
    return time.monotonic() - t_freed


def assert_clean_end(h: Home, pid: int, names: list[str], *, max_pauses: int = 1) -> list[dict[str, Any]]:
    """No crash, no traceback, every file in done/ exactly once, nothing counted as a crash."""
    assert alive(pid) and h.pid() == pid
    logs = h.log_text() + (h.path / "logs/daemon_stdout.log").read_text()
    assert "Traceback" not in logs, logs[-3000:]
    assert 1 <= len(pause_lines(h)) <= max_pauses, pause_lines(h)
    assert h.files("done") == sorted(names)
    for state in ("processing", "pending", "failed"):
        assert h.files(state) == [], (state, h.files(state))
    assert inbox_files(h) == []
    rows = jobs(h)
    assert sorted(j["name"] for j in rows) == sorted(names)
    assert all(j["state"] == "done" and j["crashes"] == 0 for j in rows), rows
    st = wait_for(lambda: h.status().get("status") == "idle" and h.status(), timeout=10, what="idle")
    assert st["paused"] is False and st["paused_reason"] is None
    return rows


def metrics_steps(h: Home) -> dict[str, list[int]]:
    """The steps status/metrics.jsonl holds, per file (every line must be whole JSON)."""
    seen: dict[str, list[int]] = {}
    for line in (h.path / "status/metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "step":
            seen.setdefault(rec["file"], []).append(rec["step"])
    return seen


def assert_metrics_once(h: Home, steps: dict[str, int]) -> None:
    """Each step of each job exactly once, in order (the stand-in trainer pauses in memory and
    goes on, so no step is redone)."""
    seen = metrics_steps(h)
    assert seen == {name: list(range(1, n + 1)) for name, n in steps.items()}, seen


def report(case: str, mode: str, recovered_s: float, **extra: Any) -> None:
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    print(f"\nENOSPC-MATRIX case={case} mode={mode} crashed=no lost=0 duplicated=0 "
          f"auto_recovered=yes recovered_in={recovered_s:.2f}s {more}".rstrip())


def launch(h: Home) -> int:
    h.launch()
    pid = h.pid()
    assert pid and alive(pid)
    wait_for(lambda: h.status().get("daemon_pid") == pid, what="the daemon's status")
    return pid


def settle(h: Home) -> None:
    """Idle, with the end of the last job written out (status, events, retention)."""
    wait_for(lambda: h.status().get("status") == "idle" and not h.status().get("current_file"), what="idle")
    time.sleep(0.5)


# ---- the matrix: the stand-in trainer ---------------------------------------------------------------
MODES = ["once", "persistent"]


@pytest.mark.parametrize("mode", MODES)
def test_intake_insert_fails(disk: Disk, mode: str) -> None:
    """A file renamed into inbox/ on a full disk: the rename into pending/ and the row go together,
    or neither: it waits in inbox/ and is queued (and trained) once space is back."""
    h = make_home(disk)
    pid = launch(h)
    settle(h)
    staged = write_jsonl(disk.mnt / "drop.jsonl", text_records(4, "drop"))   # same filesystem
    truncate_wal(h)
    disk.fill()
    os.rename(staged, h.path / "inbox/drop.jsonl")           # a rename needs no space
    wait_disk_paused(h)
    (line,) = pause_lines(h)
    assert "database or disk is full" in line, line
    assert inbox_files(h) == ["drop.jsonl"] and h.files("pending") == [] and jobs(h) == []
    assert_paused_everywhere(h)
    if mode == "persistent":
        hold_full(h, disk, pid)
        assert inbox_files(h) == ["drop.jsonl"] and jobs(h) == []
    t = disk.release()
    took = wait_recovered(h, t)
    wait_for(lambda: h.files("done") == ["drop.jsonl"], what="trained")
    (row,) = assert_clean_end(h, pid, ["drop.jsonl"])
    assert row["steps"] == 4
    assert_metrics_once(h, {"drop.jsonl": 4})
    report("intake", mode, took)


@pytest.mark.parametrize("mode", MODES)
def test_status_write_fails(disk: Disk, mode: str) -> None:
    """The status file cannot be rewritten mid-job: the job pauses at a step boundary and goes on
    where it was when space is back."""
    h = make_home(disk)
    pid = launch(h)
    write_jsonl(h.path / "inbox/long.jsonl", text_records(40, "long"))
    wait_for(lambda: (h.status().get("current_step") or 0) >= 3, what="training")
    with frozen(pid):
        disk.fill()
    wait_disk_paused(h)
    (line,) = pause_lines(h)
    assert "training_status.json" in line, line
    assert h.files("processing") == ["long.jsonl"]
    time.sleep(0.5)                        # the step under way when it paused ends, then nothing
    step = h.status()["current_step"]
    if mode == "persistent":
        hold_full(h, disk, pid)
    else:
        time.sleep(0.5)
    assert h.status()["current_step"] == step < 40, "trained on while paused"
    t = disk.release()
    took = wait_recovered(h, t)
    wait_for(lambda: h.files("done") == ["long.jsonl"], what="trained")
    (row,) = assert_clean_end(h, pid, ["long.jsonl"])
    assert row["steps"] == 40 and row["attempts"] == 1          # the same attempt went on
    assert_metrics_once(h, {"long.jsonl": 40})
    report("status write", mode, took, paused_at_step=step)


@pytest.mark.parametrize("mode", MODES)
def test_final_rename_fails(disk: Disk, mode: str) -> None:
    """The job ends while the disk is full: its rename to done/ and the row update go together or
    not at all (no endless retry of the rename); the daemon pauses and records the result once
    space is back, and `trainer-ctl stop` is obeyed meanwhile."""
    # a quiet daemon: the status file is only rewritten on a change of state; the disk fills
    # after step 11, leaving one page: room for step 12's metrics line, not for a WAL frame
    # (a page plus its header), so the first write that fails is the end of the job's commit
    h = make_home(disk, status_interval_s=60, standin_step_seconds=0.3)
    pid = launch(h)
    write_jsonl(h.path / "inbox/job.jsonl", text_records(12, "job"))
    wait_for(lambda: (h.path / "status/metrics.jsonl").exists() and 11 in metrics_steps(h).get("job.jsonl", []),
             timeout=30, what="step 11 recorded")
    with frozen(pid):
        truncate_wal(h)
        disk.fill(leave=PAGE)
    wait_disk_paused(h)
    (line,) = pause_lines(h)
    assert "database or disk is full" in line, line
    # the rename to done/ was undone with the failed commit: file and row agree
    assert h.files("processing") == ["job.jsonl"] and h.files("done") == []
    assert [j["state"] for j in jobs(h)] == ["processing"]
    assert_paused_everywhere(h)
    if mode == "persistent":
        hold_full(h, disk, pid)
        assert h.files("processing") == ["job.jsonl"] and h.files("done") == []
    t = disk.release()
    took = wait_recovered(h, t)
    wait_for(lambda: h.files("done") == ["job.jsonl"], what="recorded as done")
    (row,) = assert_clean_end(h, pid, ["job.jsonl"])
    assert row["steps"] == 12 and row["attempts"] == 1
    assert_metrics_once(h, {"job.jsonl": 12})
    report("final rename", mode, took)


@pytest.mark.parametrize("mode", MODES)
def test_metrics_append_fails(disk: Disk, mode: str) -> None:
    """status/metrics.jsonl cannot grow mid-job (the status file is not due yet): the job pauses and
    goes on, and the history keeps every step exactly once, whole lines only."""
    h = make_home(disk, status_interval_s=60)
    pid = launch(h)
    write_jsonl(h.path / "inbox/long.jsonl", text_records(80, "long"))
    wait_for(lambda: "job 1: training long.jsonl" in h.log_text(), what="training")
    with frozen(pid):
        disk.fill()
    wait_disk_paused(h)
    (line,) = pause_lines(h)
    assert "No space left on device" in line and "database" not in line, line
    if mode == "persistent":
        hold_full(h, disk, pid)
    t = disk.release()
    took = wait_recovered(h, t)
    wait_for(lambda: h.files("done") == ["long.jsonl"], what="trained")
    (row,) = assert_clean_end(h, pid, ["long.jsonl"])
    assert row["steps"] == 80 and row["attempts"] == 1
    report("metrics append", mode, took)
    assert_metrics_once(h, {"long.jsonl": 80})


@pytest.mark.parametrize("mode", MODES)
def test_state_db_commit_fails(disk: Disk, mode: str) -> None:
    """A queue change whose state.db commit fails (the disk filled between the request and the
    daemon acting on it): nothing changes, trainer-ctl gets one clear line, the daemon pauses with
    no traceback; the queue then trains in order once space is back."""
    h = make_home(disk)
    pid = launch(h)
    assert h.ctl("pause").returncode == 0
    for n in ("a", "b"):
        write_jsonl(h.path / f"inbox/{n}.jsonl", text_records(3, n))
        wait_for(lambda: f"accepted {n}.jsonl" in h.log_text(), what=f"{n} queued")   # and recorded
    time.sleep(0.3)
    with frozen(pid):
        ctl = subprocess.Popen([sys.executable, "-m", "ops.ctl",
                                "queue", "prioritize", "b.jsonl", "high"], env=env_for(h.path), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: list((h.path / "control").glob("0*.json")), what="the request written")
        truncate_wal(h)
        disk.fill()
    out, err = ctl.communicate(timeout=30)
    assert_one_clear_line(subprocess.CompletedProcess(ctl.args, ctl.returncode, out, err))
    wait_disk_paused(h)
    (line,) = pause_lines(h)
    assert "database or disk is full" in line, line
    assert [(j["name"], j["priority"], j["state"]) for j in jobs(h)] == \
        [("a.jsonl", "normal", "pending"), ("b.jsonl", "normal", "pending")]
    if mode == "persistent":
        hold_full(h, disk, pid)
    t = disk.release()
    took = wait_recovered(h, t)
    # the user's pause outlives the disk-full one
    st = wait_for(lambda: h.status().get("paused_reason") == "paused by user" and h.status(), what="user pause")
    assert st["status"] == "paused" and h.files("pending") == ["a.jsonl", "b.jsonl"]
    assert h.ctl("resume").returncode == 0
    wait_for(lambda: h.files("done") == ["a.jsonl", "b.jsonl"], what="both trained")
    rows = assert_clean_end(h, pid, ["a.jsonl", "b.jsonl"])
    assert [r["name"] for r in sorted(rows, key=lambda r: r["started_at"])] == ["a.jsonl", "b.jsonl"]
    assert_metrics_once(h, {"a.jsonl": 3, "b.jsonl": 3})
    report("state.db commit", mode, took)


# ---- steering on a full disk -------------------------------------------------------------------------
def test_stop_sigterm_and_restart_during_a_disk_full_pause(disk: Disk) -> None:
    """`trainer-ctl stop` (with the room the released reserve gives) and SIGTERM (with nothing
    free at all) both end a daemon paused for a full disk, promptly; the job waits in processing/
    and is trained exactly once after the restart, neither restart counted as a crash."""
    h = make_home(disk)
    for how in ("trainer-ctl stop", "SIGTERM"):
        pid = launch(h)
        if how == "trainer-ctl stop":
            write_jsonl(h.path / "inbox/job.jsonl", text_records(80, "job"))
        wait_for(lambda: (h.status().get("current_step") or 0) >= 3, what="training")
        with frozen(pid):
            disk.fill()
        wait_disk_paused(h)
        t0 = time.monotonic()
        if how == "trainer-ctl stop":
            r = h.ctl("stop")
            assert r.returncode == 0 and "stopping" in r.stdout, r.stderr
        else:
            assert disk.fill() < PAGE                 # nothing free: no status, no event, no log
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), timeout=15, what=f"the daemon ended by {how}")
        stopped_in = time.monotonic() - t0
        assert h.files("processing") == ["job.jsonl"] and h.files("done") == []
        assert "Traceback" not in h.log_text() + (h.path / "logs/daemon_stdout.log").read_text()
        print(f"\nENOSPC-MATRIX {how} during a disk-full pause: daemon ended in {stopped_in:.2f}s")
        disk.release()
    pid = launch(h)
    wait_for(lambda: h.files("done") == ["job.jsonl"], what="trained after the restart")
    (row,) = assert_clean_end(h, pid, ["job.jsonl"], max_pauses=2)
    assert row["attempts"] == 3 and row["steps"] == 80


def test_trainer_ctl_and_launcher_on_a_full_disk(disk: Disk, tmp_path: Path) -> None:
    """On a disk with nothing free every command that must write answers one clear line and a
    non-zero exit, and changes nothing; `trainer-ctl status` still answers and names the problem."""
    h = make_home(disk)
    pid = launch(h)
    write_jsonl(h.path / "inbox/a.jsonl", text_records(2, "a"))
    wait_for(lambda: h.files("done") == ["a.jsonl"], what="a trained")
    settle(h)
    b = write_jsonl(tmp_path / "b.jsonl", text_records(2, "b"))        # off the small disk
    truncate_wal(h)
    assert disk.fill() < PAGE
    r = h.ctl("status")
    assert r.returncode == 0 and "trainerd: idle" in r.stdout, r.stdout + r.stderr
    assert "disk:     disk full (0.0 MiB free in " in r.stdout and "Traceback" not in r.stderr
    for args in (["pause"], ["stop"], ["queue", "add", str(b)], ["config", "unlock", "max_length"]):
        assert_one_clear_line(h.ctl(*args))
    assert alive(pid) and [p.name for p in (h.path / "inbox").iterdir()] == []   # no staged copy left
    # the daemon down: trainer-ctl changes the queue itself, and the launcher cannot start one
    disk.release()
    assert h.ctl("stop").returncode == 0
    wait_for(lambda: not alive(pid), what="stopped")
    assert h.ctl("queue", "add", str(b)).returncode == 0 and h.files("pending") == ["b.jsonl"]
    truncate_wal(h)
    assert disk.fill() < PAGE
    for args in (["queue", "prioritize", "b.jsonl", "high"], ["queue", "remove", "b.jsonl"]):
        assert_one_clear_line(h.ctl(*args))
    # reading needs no space: the queue and the status still show (state.db with no writer open)
    assert [(j["name"], j["state"], j["priority"]) for j in jobs(h)] == \
        [("b.jsonl", "pending", "normal"), ("a.jsonl", "done", "normal")]
    assert h.files("pending") == ["b.jsonl"] and h.files("failed") == []
    r = h.launch(check=False)
    assert_one_clear_line(r, prog="trainerd")
    time.sleep(0.5)
    r = h.ctl("status")                                         # and no daemon was left behind
    assert r.returncode == 3 and "trainerd: daemon not running" in r.stdout, r.stdout + r.stderr
    assert "queue:    pending 1 · processing 0 · done 1 · failed 0" in r.stdout
    assert "disk:     disk full (0.0 MiB free in " in r.stdout
    disk.release()
    pid = launch(h)
    wait_for(lambda: h.files("done") == ["a.jsonl", "b.jsonl"], what="b trained")
    assert alive(pid) and "Traceback" not in h.log_text()
    assert sorted((j["name"], j["state"], j["crashes"]) for j in jobs(h)) == [("a.jsonl", "done", 0), ("b.jsonl", "done", 0)]


# ---- the monitor's upload ------------------------------------------------------------------------------
def start_monitor(h: Home, out: Path) -> tuple[subprocess.Popen, str]:
    """`python -m monitor` (real uvicorn) for *h* on a free loopback port; its output off the disk."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = env_for(h.path)
    env.pop("TRAINER_MONITOR_TOKEN", None)
    log = open(out, "w")
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "--home", str(h.path), "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, out.read_text()
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(up, what="monitor up")
    return proc, base


REQ = {"X-Trainer-Request": "1"}


def upload(base: str, name: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{base}/api/queue", params={"name": name}, content=body, timeout=30,
                      headers={**REQ, "Content-Type": "application/x-ndjson"})


def assert_507(r: httpx.Response) -> None:
    assert r.status_code == 507, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert detail.startswith("disk full (") and " MiB free in " in detail, detail


def daemon_and_monitor(disk: Disk, tmp_path: Path) -> tuple[Home, int, subprocess.Popen, str, bytes]:
    """A running daemon and monitor on the small disk, settled, and an upload body."""
    h = make_home(disk)
    pid = launch(h)
    proc, base = start_monitor(h, tmp_path / "monitor.out")
    disk.cleanups.append(lambda: (proc.terminate(), proc.wait(5)))
    settle(h)
    return h, pid, proc, base, "".join(json.dumps(r) + "\n" for r in text_records(3, "up")).encode()


def test_monitor_upload_on_a_full_disk_is_507(disk: Disk, tmp_path: Path) -> None:
    """The dashboard's upload (and a control button) on a full disk: 507 with the free space in a
    JSON error, never a 500; nothing half-written is left; after space is back uploads work."""
    h, pid, proc, base, body = daemon_and_monitor(disk, tmp_path)
    assert disk.fill() < PAGE
    assert_507(upload(base, "up.jsonl", body))
    files = {"file": ("up2.jsonl", body, "application/x-ndjson")}
    assert_507(httpx.post(f"{base}/api/queue", files=files, headers=REQ, timeout=30))
    assert_507(httpx.post(f"{base}/api/control/pause", headers=REQ, timeout=30))
    assert [p.name for p in (h.path / "inbox").iterdir()] == []           # no staged part left
    assert [p.name for p in (h.path / "control").glob("*.json")] == []
    # the daemon down: the upload would be saved into inbox/ for its next start
    disk.release()
    assert h.ctl("stop").returncode == 0
    wait_for(lambda: not alive(pid), what="stopped")
    assert disk.fill() < PAGE
    assert_507(upload(base, "up.jsonl", body))
    assert [p.name for p in (h.path / "inbox").iterdir()] == []
    # no unhandled error (uvicorn's 500); the monitor's own log lines that cannot be written
    # meanwhile are dropped quietly (counted, said once space is back), no traceback for each
    out = (tmp_path / "monitor.out").read_text()
    assert "Exception in ASGI application" not in out and "--- Logging error ---" not in out, out[-3000:]
    disk.release()
    pid = launch(h)
    r = upload(base, "up.jsonl", body)
    assert r.status_code == 201, r.text
    wait_for(lambda: h.files("done") == ["up.jsonl"], what="the upload trained")
    assert alive(pid) and proc.poll() is None


def test_monitor_upload_whose_intake_commit_fails_is_507(disk: Disk, tmp_path: Path) -> None:
    """The staged copy fits, but the daemon cannot record it (state.db commit): 507, and the file
    is not lost: it waits in inbox/ and is trained once space is back."""
    h, pid, proc, base, body = daemon_and_monitor(disk, tmp_path)
    truncate_wal(h)
    disk.fill(leave=2 * PAGE)                    # the staged copy and the control request
    r = upload(base, "up.jsonl", body)
    wait_disk_paused(h)
    t = disk.release()
    wait_recovered(h, t)
    wait_for(lambda: h.files("done") == ["up.jsonl"], what="the upload trained")
    assert alive(pid)
    assert_507(r)
    assert "the file waits in inbox/" in r.json()["detail"]


# ---- the matrix: the real QLoRA worker --------------------------------------------------------------
REAL = dict(trainer="qlora", max_length=64, batch_size=2, gradient_accumulation=1, learning_rate=2e-3,
            lr_scheduler="constant", keep_checkpoints=1, layer_activity_every_steps=1000,
            eval_fraction=0.0, worker_timeout_s=120)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny real base, off the small disk (only the base dir lives there)."""
    from trainer.tiny_base import build_tiny_base
    return build_tiny_base(tmp_path_factory.mktemp("diskfull_base") / "tiny", seed=0)


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE) * PAGE


def tmpfs_size(folder: Path) -> int:
    """What the files of *folder* take on a tmpfs (whole pages each)."""
    return sum(pages(p.stat().st_size) for p in folder.iterdir() if p.is_file())


@pytest.fixture(scope="session")
def real_sizes(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What a checkpoint and an adapter of the REAL settings take on the tmpfs, measured once by
    running the product's recipe in this process up to its first checkpoint (on an ordinary disk)."""
    from core.atomic import sha256_file
    from core.config import Config, config_to_dict
    from core.interface import Command, JobSpec, Outcome, QueueControl
    from trainer.recipe import QLoRATrainer

    home = tmp_path_factory.mktemp("diskfull_calibration")
    Layout(home).ensure()
    data = write_jsonl(home / "calibration.jsonl", generate_records(16, seed=1))
    cfg = config_to_dict(Config(**{**REAL, "base_model": str(tiny_base_dir), "checkpoint_every_steps": 1}))
    control = QueueControl()

    class StopAtFirstCheckpoint:
        def emit(self, ev: dict[str, Any]) -> None:
            if ev.get("event") == "checkpoint":
                control.send(Command.STOP)

    job = JobSpec(job_id=1, name=data.name, dataset=data, sha256=sha256_file(data), home=home, config=cfg)
    result = QLoRATrainer().run(job, StopAtFirstCheckpoint(), control)
    assert result.outcome is Outcome.STOPPED and result.steps == 1, result
    ckpt = home / "checkpoints/job-1/step-1"
    adapter = sum(pages((ckpt / n).stat().st_size) for n in ("adapter_model.safetensors", "adapter_config.json"))
    return {"checkpoint": tmpfs_size(ckpt), "adapter": adapter}


def real_home(disk: Disk, base: Path, **config: Any) -> Home:
    return make_home(disk, **REAL, base_model=str(base), **config)


def worker_pid(daemon_pid: int) -> int:
    """The worker subprocess of the daemon, as soon as it is started."""
    def find() -> int | None:
        out = subprocess.run(["pgrep", "-P", str(daemon_pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None
    return wait_for(find, timeout=30, what="the worker process")


def training_log(h: Home) -> str:
    return (h.path / "logs/training_output.log").read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_write_fails_mid_training(disk: Disk, tiny_base_dir: Path, real_sizes: dict[str, int],
                                             mode: str) -> None:
    """The real worker cannot write a periodic checkpoint: the attempt ends (nothing half-written
    is left), the job goes back to the head of the queue without a crash counted, and once space
    is back it resumes from its last checkpoint and completes."""
    h = real_home(disk, tiny_base_dir, checkpoint_every_steps=2)
    pid = launch(h)
    write_jsonl(h.path / "inbox/long.jsonl", generate_records(24, seed=2))
    wait_for(lambda: h.status().get("current_file") == "long.jsonl", what="claimed")
    with frozen(worker_pid(pid)):              # still loading: nothing written yet
        # room for one checkpoint (step 2) but not for two at once (step 4, before step 2 is pruned)
        disk.fill(leave=real_sizes["checkpoint"] * 3 // 2)
    wait_disk_paused(h, timeout=90)
    (line,) = pause_lines(h)
    # the first write to meet the full disk names it: the worker's checkpoint, or the daemon's status
    # write in the moment the half-written checkpoint takes the last page (the worker fails just after)
    assert ("(disk full: OSError: [Errno 28] No space left on device" in line
            or "(No space left on device writing " in line), line
    wait_for(lambda: any("disk full: OSError: [Errno 28] No space left on device" in m
                         for m in event_messages(h, "interrupted")), what="the worker's verdict")
    # the failed checkpoint left nothing behind; the last good one is intact
    assert sorted(p.name for p in (h.path / "checkpoints/job-1").iterdir()) == ["step-2"]
    assert h.files("pending") == ["long.jsonl"] and h.files("processing") == []
    (row,) = jobs(h)
    assert row["state"] == "pending" and row["resume"] and row["crashes"] == 0, row
    assert_paused_everywhere(h)
    if mode == "persistent":
        hold_full(h, disk, pid)
        assert h.files("pending") == ["long.jsonl"] and jobs(h)[0]["crashes"] == 0
    t = disk.release()
    took = wait_recovered(h, t)
    wait_for(lambda: h.files("done") == ["long.jsonl"], timeout=120, what="trained")
    (row,) = assert_clean_end(h, pid, ["long.jsonl"])
    total = row["steps"]
    assert row["attempts"] == 2 and total >= 6, row
    assert f"resumed from {h.path / 'checkpoints/job-1/step-2'} (step 2," in training_log(h)
    state = json.loads((h.path / "current_model/trainer_state.json").read_text())
    assert [(d["name"], d["steps"]) for d in state["datasets"]] == [("long.jsonl", total)]
    report("checkpoint (real worker)", mode, took, total_steps=total, resumed_from_step=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_snapshot_write_fails(disk: Disk, tiny_base_dir: Path, real_sizes: dict[str, int], mode: str) -> None:
    """The real worker publishes current_model/ but cannot write the dataset's snapshot: the job is
    not failed and not trained twice; once space is back the snapshot is written and it is done."""
    h = real_home(disk, tiny_base_dir, checkpoint_every_steps=1000)
    pid = launch(h)
    write_jsonl(h.path / "inbox/one.jsonl", text_records(4, "one"))
    wait_for(lambda: h.status().get("current_file") == "one.jsonl", what="claimed")
    # what the end of the job writes: the final checkpoint, then current_model/ (adapter +
    # trainer_state.json + manifest), then the snapshot (adapter + snapshot.json + manifest)
    current = snapshot = real_sizes["adapter"] + 2 * PAGE
    with frozen(worker_pid(pid)):              # still loading: nothing written yet
        # room for the checkpoint and current_model/, and for half the snapshot (+ 16 KiB for the
        # small writes meanwhile: status, events, logs; + a page for the job's replay pool)
        disk.fill(leave=real_sizes["checkpoint"] + current + snapshot // 2 + 5 * PAGE)
    wait_disk_paused(h, timeout=90)
    (line,) = pause_lines(h)
    assert "(disk full: OSError: [Errno 28] No space left on device" in line, line   # the worker's verdict
    state = json.loads((h.path / "current_model/trainer_state.json").read_text())
    assert [d["name"] for d in state["datasets"]] == ["one.jsonl"]      # published
    assert list((h.path / "snapshots").iterdir()) == []                # no snapshot, no leftover
    (row,) = jobs(h)
    assert row["state"] == "pending" and row["crashes"] == 0, row
    if mode == "persistent":
        hold_full(h, disk, pid)
        assert_one_clear_line(h.ctl("snapshot", "--description", "by hand"))
        assert list((h.path / "snapshots").iterdir()) == []
    t = disk.release()
    took = wait_recovered(h, t)
    wait_for(lambda: h.files("done") == ["one.jsonl"], timeout=120, what="done")
    assert_clean_end(h, pid, ["one.jsonl"])
    assert "was already trained into current_model/; nothing to do" in training_log(h)
    state = json.loads((h.path / "current_model/trainer_state.json").read_text())
    assert [d["name"] for d in state["datasets"]] == ["one.jsonl"]     # not trained twice
    (snap,) = (h.path / "snapshots").iterdir()
    meta = json.loads((snap / "snapshot.json").read_text())
    assert meta["job_id"] == 1 and meta["dataset"] == "one.jsonl"
    report("snapshot (real worker)", mode, took)


# ---- the writers themselves, in process ---------------------------------------------------------------
def test_metrics_lines_wait_in_memory_while_the_disk_is_full(disk: Disk) -> None:
    """StatusBoard on a full disk: no record is lost, none is torn; write_error says why."""
    from daemon.status import StatusBoard

    layout = Layout(disk.mnt / "home")
    layout.ensure()
    board = StatusBoard(layout, interval=0)
    board.append_metric({"event": "step", "step": 0, "pad": "x" * 300})
    board.flush(force=True)
    assert board.write_error is None
    disk.fill()
    for step in range(1, 201):
        board.append_metric({"event": "step", "step": step, "pad": "x" * 300})
    assert board.write_error is not None and "No space left on device" in board.write_error
    board.flush(force=True)                         # still full: nothing raises
    assert board.write_error is not None
    disk.release()
    board.flush(force=True)
    assert board.write_error is None
    board.close()
    data = layout.metrics_file.read_bytes()
    assert data.endswith(b"\n")
    assert [json.loads(line)["step"] for line in data.splitlines()] == list(range(201))


def test_log_lines_are_dropped_quietly_and_counted_while_the_disk_is_full(disk: Disk, capsys) -> None:
    import logging

    from core.logsetup import DailyFileHandler

    handler = DailyFileHandler(disk.mnt / "logs", prefix="unit")
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.diskfull.writers")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("before")
        disk.fill()
        for i in range(50):
            logger.warning("while full %d %s", i, "y" * 200)
        assert handler.dropped > 0
        disk.release()
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "Logging error" not in capsys.readouterr().err
    (path,) = (disk.mnt / "logs").iterdir()
    lines = path.read_text().splitlines()
    assert lines[0] == "WARNING before" and lines[-1] == "WARNING after"
    assert lines[-2].endswith("log line(s) dropped: the disk was full")
    whole = [line for line in lines if "while full" in line and line.endswith("y" * 200)]
    torn = [line for line in lines if "while full" in line and not line.endswith("y" * 200)]
    dropped = int(lines[-2].split(" log line(s)")[0].rsplit(" ", 1)[1])
    assert len(torn) <= 1 and len(whole) + dropped == 50       # a torn one counts as dropped
