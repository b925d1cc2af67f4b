#!/usr/bin/env python
"""Crash loop: random SIGKILLs of the daemon and its worker never lose, duplicate or change training.

Two runs over the same queue of deterministic JSONL files (daemon/generator.py), each in its own
base dir, with the product's default settings except ``base_model`` (the tiny base, or ``--base``)
and ``checkpoint_every_steps`` (5: the default 50 is more than a whole file takes here):

* **A**, uninterrupted: launch the daemon with bin/launch_training_daemon.sh, drop all files into
  inbox/ (one rename each), wait until every one is in queue/done/.
* **B**, the same queue under ``--kills`` SIGKILLs chosen by a seeded RNG (see ``Killer``: the
  kills are spread over the files, each file dropped when its turn comes), at three moments:

  - ``after-drop``: a file is renamed into inbox/ and the daemon is killed 0.5-150 ms later
    (log-uniform: before, during or after it takes the file into pending/);
  - ``mid-step``: while a worker trains (a new ``step N/M`` line in logs/training_output.log),
    0-2.5 s later (a step takes ~0.2 s; a checkpoint ~0.04 s);
  - ``checkpoint-write``: the moment a ``checkpoints/job-*/.tmp-step-*`` folder appears (polled every
    millisecond), 0-25 ms later (a write takes ~40 ms), i.e. inside the checkpoint write
    (``inside_write``: its ``step-N`` was never renamed into place);

  each of the daemon (then relaunched at once with the launcher; its worker dies with it,
  PR_SET_PDEATHSIG) or of the worker subprocess (found among the daemon's children by its cmdline
  ``trainer.worker``; the daemon starts the next attempt itself). A worker is killed only once its
  attempt has written a new checkpoint (a ``checkpoint`` event in state.db after the attempt's
  ``started`` event): a worker killed before that is an attempt counted against ``max_attempts``
  with a 30 s/60 s back-off, by design (daemon/main.py ``_job_failed``); counted attempts are
  reported anyway (``strikes``).

Then, for each run: every file in queue/done/ exactly once (by name and sha256), none in
pending/, processing/, failed/ or inbox/, none lost, none duplicated, state.db rows = files,
current_model/trainer_state.json lists each dataset exactly once, in drop order; and run B's
``current_model/adapter_model.safetensors`` equal to run A's (max abs diff over all tensors; 0 on
CPU, where resume is bitwise exact). A JSON result goes to bench/results/; the exit status is 1
if any invariant fails.

    python bench/crash_loop.py                       # 6 files, 20 kills, seed 0
    python bench/crash_loop.py --files 2 --kills 4 --records 600 --out /tmp/cl.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LAUNCHER = REPO / "bin" / "launch_training_daemon.sh"
STATES = ("pending", "processing", "done", "failed")
MOMENTS = ("after-drop", "mid-step", "checkpoint-write")
TARGETS = ("daemon", "worker")
STEP_RE = re.compile(r"trainer\.recipe: step (\d+)/(\d+)")
JOB_ARG_RE = re.compile(r"job-(\d+)-[^/]*\.json$")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ================================================================ processes
def proc_alive(pid: int | None) -> bool:
    """True while *pid* runs (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] != "Z":
            out.append(int(entry.name))
    return out


class Home:
    """One base dir: its config, the launcher, trainer-ctl, the daemon and worker pids."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.env = {**env, "TRAINER_HOME": str(path)}
        self.launches: list[dict[str, Any]] = []

    def q(self, state: str) -> Path:
        return self.path / "queue" / state

    def files(self, state: str) -> list[str]:
        d = self.q(state)
        return sorted(p.name for p in d.iterdir() if not p.name.endswith(".error.json")) if d.is_dir() else []

    def inbox(self) -> list[str]:
        d = self.path / "inbox"
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def launch(self) -> dict[str, Any]:
        t0 = time.monotonic()
        r = subprocess.run([str(LAUNCHER), "--home", str(self.path)], env=self.env, capture_output=True,
                           text=True, timeout=180)
        pid = self.daemon_pid()
        rec = {"rc": r.returncode, "pid": pid, "seconds": round(time.monotonic() - t0, 2),
               "ok": r.returncode == 0 and proc_alive(pid)}
        if not rec["ok"]:
            rec["output"] = (r.stdout + r.stderr)[-2000:]
            log(f"launcher failed (rc {r.returncode}): {rec['output']}")
        self.launches.append(rec)
        return rec

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.ctl", "--home", str(self.path), *args],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def daemon_pid(self) -> int | None:
        try:
            pid = int((self.path / ".daemon.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        args = cmdline(pid)
        return pid if proc_alive(pid) and "daemon" in args and str(self.path) in args else None

    def worker_pid(self, daemon: int | None = None) -> tuple[int, int] | None:
        """(pid, job id) of the daemon's live worker subprocess, or None."""
        daemon = daemon or self.daemon_pid()
        if not daemon:
            return None
        for pid in children(daemon):
            args = cmdline(pid)
            if "trainer.worker" in args:
                # a one-job worker names its job file in argv; the warm (serving) worker's job
                # is the job file the daemon wrote for the attempt under way (status/jobs/)
                names = [args[-1]] if args and "--job" in args else \
                    [p.name for p in (self.path / "status" / "jobs").glob("job-*.json")]
                ids = {int(m.group(1)) for n in names if (m := JOB_ARG_RE.search(n))}
                return pid, ids.pop() if len(ids) == 1 else -1
        return None

    def stop(self, timeout: float = 180) -> bool:
        pid = self.daemon_pid()
        if not pid:
            return True
        self.ctl("stop")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc_alive(pid):
            time.sleep(0.2)
        if proc_alive(pid):
            os.kill(pid, signal.SIGKILL)
            return False
        return True

    def kill_everything(self) -> None:
        pid = self.daemon_pid()
        if pid:
            w = self.worker_pid(pid)
            for p in ([w[0]] if w else []) + [pid]:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ---- state.db (read-only) -------------------------------------------------------------------
    def db(self) -> sqlite3.Connection | None:
        p = self.path / "status" / "state.db"
        if not p.exists():
            return None
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        for _ in range(20):
            conn = None
            try:
                conn = self.db()
                return [] if conn is None else conn.execute(sql, args).fetchall()
            except sqlite3.OperationalError:
                time.sleep(0.05)
            finally:
                if conn is not None:
                    conn.close()
        return []

    def attempt(self) -> tuple[int, int, bool] | None:
        """(started event id, job id, made progress) of the newest attempt, per state.db."""
        rows = self.query("SELECT id, job_id FROM events WHERE kind = 'started' ORDER BY id DESC LIMIT 1")
        if not rows:
            return None
        ev, job = rows[0]["id"], rows[0]["job_id"]
        ck = self.query("SELECT 1 FROM events WHERE kind = 'checkpoint' AND job_id = ? AND id > ? LIMIT 1",
                        (job, ev))
        return ev, job, bool(ck)

    def training_log_size(self) -> int:
        try:
            return (self.path / "logs" / "training_output.log").stat().st_size
        except FileNotFoundError:
            return 0

    def steps_since(self, offset: int) -> list[tuple[int, int]]:
        try:
            with open(self.path / "logs" / "training_output.log", "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [(int(a), int(b)) for a, b in STEP_RE.findall(text)]

    def ckpt_temps(self) -> list[Path]:
        root = self.path / "checkpoints"
        out = []
        try:
            for job in os.scandir(root):
                if job.name.startswith("job-") and job.is_dir():
                    out += [Path(e.path) for e in os.scandir(job.path) if e.name.startswith(".tmp-step-")]
        except FileNotFoundError:
            pass
        return out


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return None


# ================================================================ the data
def make_datasets(n_files: int, records: int, seed: int) -> list[tuple[str, bytes]]:
    """(name, content) of each file, in drop order: deterministic for (n_files, records, seed)."""
    from daemon.generator import generate_records

    kinds = ("arithmetic", "syllables", "arithmetic2")
    out = []
    for i in range(n_files):
        kind = kinds[i % len(kinds)]
        recs = generate_records(records, seed=seed * 1000 + i, kind=kind)
        out.append((f"{i + 1:02d}_{kind}.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode()))
    return out


def stage(datasets: list[tuple[str, bytes]], folder: Path) -> list[Path]:
    """Write the files to a staging folder (same filesystem as the homes), mtimes in drop order."""
    folder.mkdir(parents=True)
    paths = []
    base = time.time_ns() - 10 ** 9 * len(datasets)
    for i, (name, data) in enumerate(datasets):
        p = folder / name
        p.write_bytes(data)
        os.utime(p, ns=(base + i * 10 ** 9, base + i * 10 ** 9))
        paths.append(p)
    return paths


def drop(staged: Path, home: Home) -> None:
    os.rename(staged, home.path / "inbox" / staged.name)     # complete at once: a rename


# ================================================================ verification
def verify_home(home: Path, expected: list[tuple[str, str]]) -> dict[str, Any]:
    """Where every expected (name, sha256) is, and whether the queue keeps the promise.

    lost: an expected content found in no queue folder and not in inbox/; duplicated: a content
    found more than once (folders or state.db rows) or trained more than once (lineage).
    """
    names = [n for n, _ in expected]
    want = {s: n for n, s in expected}
    where: dict[str, list[str]] = {s: [] for _, s in expected}
    folders: dict[str, list[str]] = {}
    extra_files: list[str] = []
    for state in (*STATES, "inbox"):
        d = home / "inbox" if state == "inbox" else home / "queue" / state
        items = sorted(p for p in d.iterdir() if not p.name.endswith(".error.json")
                       and not p.name.startswith(".")) if d.is_dir() else []
        folders[state] = [p.name for p in items]
        for p in items:
            s = sha256(p) if p.is_file() else None
            if s in where:
                where[s].append(f"{state}/{p.name}")
            else:
                extra_files.append(f"{state}/{p.name}")
    done_ok = [n for n, s in expected if where[s] == [f"done/{n}"]]
    lost = [want[s] for s, locs in where.items() if not locs]
    dup_files = {want[s]: locs for s, locs in where.items() if len(locs) > 1}

    rows: list[dict[str, Any]] = []
    db = home / "status" / "state.db"
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            rows = [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
            events = {r["kind"]: r["n"] for r in conn.execute(
                "SELECT kind, COUNT(*) AS n FROM events GROUP BY kind")}
            retries = [r["message"] for r in conn.execute("SELECT message FROM events WHERE kind = 'job_retry'")]
        finally:
            conn.close()
    else:
        events, retries = {}, []
    rows_by_sha: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        rows_by_sha.setdefault(r["sha256"], []).append(r)
    dup_rows = {want.get(s, s): [f"{r['id']}:{r['name']}:{r['state']}" for r in rs]
                for s, rs in rows_by_sha.items() if len(rs) > 1}
    row_problems = []
    for n, s in expected:
        rs = rows_by_sha.get(s, [])
        if len(rs) != 1 or rs[0]["state"] != "done" or rs[0]["name"] != n:
            row_problems.append(f"{n}: rows {[(r['id'], r['name'], r['state']) for r in rs]}")
    row_problems += [f"unexpected row {r['id']} {r['name']} ({r['state']})" for r in rows if r["sha256"] not in want]

    state_path = home / "current_model" / "trainer_state.json"
    try:
        tstate = json.loads(state_path.read_text())
    except (OSError, ValueError):
        tstate = {}
    lineage = [{"name": d.get("name"), "sha256": d.get("sha256"), "steps": d.get("steps"),
                "job_id": d.get("job_id")} for d in tstate.get("datasets") or []]
    lineage_shas = [d["sha256"] for d in lineage]
    lineage_dups = sorted({want.get(s, s) for s in lineage_shas if lineage_shas.count(s) > 1})
    lineage_exact = [d["name"] for d in lineage] == names and lineage_shas == [s for _, s in expected]

    snapshots = [p.name for p in (home / "snapshots").iterdir()
                 if p.is_dir() and not p.name.startswith(".")] if (home / "snapshots").is_dir() else []
    leftovers = ([str(p.relative_to(home)) for p in (home / "checkpoints").glob("job-*")]
                 + [str(p.relative_to(home)) for p in (home / "checkpoints").glob("set-aside/job-*")]
                 + [str(p.relative_to(home)) for p in (home / "status" / "jobs").glob("*.json")])
    strikes = sum(1 for m in retries if "without progress" in m)
    duplicated = sorted(set(dup_files) | set(dup_rows) | set(lineage_dups))
    return {
        "expected": len(expected), "done_exactly_once": len(done_ok),
        "folders": {k: len(v) for k, v in folders.items()}, "folder_names": folders,
        "lost": lost, "duplicated": duplicated, "duplicated_detail": {"files": dup_files, "rows": dup_rows,
                                                                      "lineage": lineage_dups},
        "extra_files": extra_files, "db_rows": len(rows), "db_problems": row_problems,
        "attempts": {r["name"]: r["attempts"] for r in rows}, "crashes_column": {r["name"]: r["crashes"] for r in rows},
        "strikes": strikes, "retries_after_progress": sum(1 for m in retries if "made progress" in m),
        "events": {k: events.get(k, 0) for k in ("started", "checkpoint", "completed", "reconciled",
                                                  "restarted", "job_retry", "job_failed", "daemon_start")},
        "lineage": lineage, "lineage_exact": lineage_exact, "total_steps": tstate.get("total_steps"),
        "snapshots": len(snapshots), "leftovers": leftovers,
    }


def invariants_of(v: dict[str, Any], prefix: str) -> dict[str, bool]:
    f = v["folders"]
    return {
        f"{prefix}: every file in done/ exactly once": v["done_exactly_once"] == v["expected"] == f["done"],
        f"{prefix}: 0 in processing/": f["processing"] == 0,
        f"{prefix}: 0 in failed/": f["failed"] == 0,
        f"{prefix}: 0 in pending/ and inbox/": f["pending"] == 0 and f["inbox"] == 0,
        f"{prefix}: 0 lost": not v["lost"],
        f"{prefix}: 0 duplicated": not v["duplicated"] and not v["extra_files"],
        f"{prefix}: state.db rows = files, all done": not v["db_problems"] and v["db_rows"] == v["expected"],
        f"{prefix}: lineage lists each dataset once, in drop order": v["lineage_exact"],
    }


def compare_adapters(a: Path, b: Path) -> dict[str, Any]:
    """Max abs difference over every tensor of two safetensors files (inf if they do not match up)."""
    from safetensors.torch import load_file

    if not a.is_file() or not b.is_file():
        return {"max_abs_diff": float("inf"), "problem": f"missing: {[str(p) for p in (a, b) if not p.is_file()]}"}
    ta, tb = load_file(str(a)), load_file(str(b))
    out: dict[str, Any] = {"tensors": len(ta), "values": int(sum(t.numel() for t in ta.values())),
                           "bitwise_equal": a.read_bytes() == b.read_bytes()}
    if set(ta) != set(tb):
        out.update(max_abs_diff=float("inf"), problem=f"different tensors: {sorted(set(ta) ^ set(tb))[:5]}")
        return out
    worst, worst_name, unequal = 0.0, None, 0
    for k in sorted(ta):
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            out.update(max_abs_diff=float("inf"), problem=f"{k}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}")
            return out
        d = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        if d != d:   # NaN somewhere
            d = float("inf")
        unequal += int(d > 0)
        if d > worst:
            worst, worst_name = d, k
    out.update(max_abs_diff=worst, worst_tensor=worst_name, unequal_tensors=unequal)
    return out


# ================================================================ the runs
def write_config(home: Path, settings: dict[str, Any]) -> None:
    home.mkdir(parents=True)
    (home / "config.json").write_text(json.dumps(settings, indent=2) + "\n")


def all_done(home: Home, n: int) -> bool:
    return (len(home.files("done")) + len(home.files("failed")) >= n and not home.files("pending")
            and not home.files("processing") and not home.inbox())


def run_a(home: Home, staged: list[Path], timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    home.launch()
    for p in staged:
        drop(p, home)
    log(f"A: daemon {home.daemon_pid()}, dropped {len(staged)} files; waiting")
    finished = wait_until(lambda: all_done(home, len(staged)), timeout, 0.5)
    wall = time.monotonic() - t0
    stopped = home.stop()
    log(f"A: {'all settled' if finished else 'TIMED OUT'} after {wall:.1f} s")
    return {"wall_s": round(wall, 2), "finished": bool(finished), "clean_stop": stopped,
            "launches": home.launches}


class Killer:
    """Run B's kill schedule. Every random choice is drawn up front from one seeded RNG.

    The kills are spread over the files (``kills // files`` each, the remainder to files the RNG
    picks). File *j* is dropped when its turn comes; its first kill is an after-drop kill with
    probability 1/2 (else the file is dropped without one), the others are mid-step or
    checkpoint-write kills of the daemon or the worker that wait until file *j* trains. A kill
    that cannot land on its file (the job ended first) moves on to the next file.
    """

    def __init__(self, home: Home, staged: list[Path], kills: int, seed: int, timeout: float) -> None:
        self.home, self.staged, self.n_kills = home, list(staged), kills
        rng = random.Random(seed)
        n = len(staged)
        counts = [kills // n] * n
        for j in rng.sample(range(n), kills % n):
            counts[j] += 1
        self.plan: list[dict[str, Any]] = []
        for j in range(n):
            for k in range(counts[j]):
                coin, moment, target, frac = rng.random(), rng.choice(MOMENTS[1:]), rng.choice(TARGETS), rng.random()
                if k == 0 and coin < 0.5:
                    moment, target = "after-drop", "daemon"
                self.plan.append({"file": j, "moment": moment, "target": target, "frac": frac})
        self.records: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def current_job(self) -> str | None:
        rows = self.home.query("SELECT name FROM jobs WHERE state = 'processing' LIMIT 1")
        return rows[0]["name"] if rows else None

    def job_id(self, name: str) -> int | None:
        rows = self.home.query("SELECT id FROM jobs WHERE name = ?", (name,))
        return rows[0]["id"] if rows else None

    def ended(self, name: str) -> bool:
        return name in self.home.files("done") or name in self.home.files("failed")

    def kill_daemon(self, rec: dict[str, Any], probe: Callable[[], dict[str, Any]] | None = None) -> None:
        """SIGKILL the daemon (its worker dies with it), look at what it left (*probe*), relaunch."""
        pid = self.home.daemon_pid()
        if not pid:
            rec["why"] = "no daemon"
            return
        w = self.home.worker_pid(pid)
        os.kill(pid, signal.SIGKILL)
        rec.update(target="daemon", pid=pid, worker_alive=bool(w), landed=True, t=self.now())
        gone = wait_until(lambda: not proc_alive(pid) and not (w and proc_alive(w[0])), 30, 0.002)
        rec["worker_died_with_it"] = bool(gone) if w else None
        if probe is not None:
            rec.update(probe())
        rec["relaunch"] = self.home.launch()

    def kill_worker(self, rec: dict[str, Any], name: str) -> bool:
        """Kill the worker training *name* if its attempt has made progress; False if not (yet) so."""
        a = self.home.attempt()
        if a is None or not a[2] or a[1] != self.job_id(name):
            return False
        w = self.home.worker_pid()
        if w is None or w[1] != a[1]:
            return False
        b = self.home.attempt()
        if b is None or b[0] != a[0]:
            return False
        try:
            os.kill(w[0], signal.SIGKILL)
        except ProcessLookupError:
            return False
        rec.update(target="worker", pid=w[0], landed=True, t=self.now())
        return True

    def after_drop(self, p: Path, frac: float) -> dict[str, Any]:
        delay = 0.0005 * 300 ** frac      # log-uniform, 0.5 ms to 150 ms
        rec: dict[str, Any] = {"moment": "after-drop", "target": "daemon", "job": p.name,
                               "delay_s": round(delay, 4), "landed": False}
        drop(p, self.home)
        time.sleep(delay)
        self.kill_daemon(rec, lambda: {"file_at_kill": next(
            (s for s in (*STATES, "inbox") if p.name in
             (self.home.inbox() if s == "inbox" else self.home.files(s))), None)})
        return rec

    def mid_step(self, name: str, target: str, frac: float) -> dict[str, Any]:
        delay = 2.5 * frac
        rec: dict[str, Any] = {"moment": "mid-step", "target": target, "job": name,
                               "delay_s": round(delay, 3), "landed": False}
        until = min(self.deadline, time.monotonic() + 900)
        while time.monotonic() < until:
            # *name* is the job in processing/, then a new "step N/M" line: its worker trains
            if not wait_until(lambda: self.ended(name) or self.current_job() == name,
                              until - time.monotonic(), 0.05):
                break
            offset = self.home.training_log_size()
            if not wait_until(lambda: self.ended(name) or self.current_job() != name
                              or self.home.steps_since(offset), until - time.monotonic(), 0.05):
                break
            if self.ended(name):
                rec["why"] = "job ended first"
                return rec
            if self.current_job() != name:
                continue
            if target == "worker":      # wait for this attempt's first new checkpoint
                if not wait_until(lambda: (self.home.attempt() or (0, 0, False))[2]
                                  or not self.home.worker_pid(), 120, 0.05):
                    continue
            time.sleep(delay)
            steps = self.home.steps_since(offset)
            rec["step"] = list(steps[-1]) if steps else None
            if target == "worker":
                if self.kill_worker(rec, name):
                    return rec
                continue                # the attempt ended meanwhile: wait for the next one
            if self.current_job() != name:
                continue
            self.kill_daemon(rec)
            return rec
        rec["why"] = "timed out"
        return rec

    def checkpoint_write(self, name: str, target: str, frac: float) -> dict[str, Any]:
        """Poll every millisecond for a temp checkpoint folder of *name*'s job. For a worker kill,
        which worker may die is settled beforehand ("armed": its attempt already wrote a
        checkpoint), so the kill follows the folder's appearance by ~1 ms + the delay."""
        delay = 0.025 * frac
        rec: dict[str, Any] = {"moment": "checkpoint-write", "target": target, "job": name,
                               "delay_s": round(delay, 4), "landed": False}
        until = min(self.deadline, time.monotonic() + 900)
        seen: set[Path] = set(self.home.ckpt_temps())
        armed: int | None = None
        job_id: int | None = None
        last_arm = last_check = 0.0
        while time.monotonic() < until:
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                if self.ended(name):
                    rec["why"] = "job ended first"
                    return rec
                job_id = job_id or self.job_id(name)
            if target == "worker" and now - last_arm > 0.1:
                last_arm = now
                a, w = self.home.attempt(), self.home.worker_pid()
                armed = (w[0] if a is not None and a[2] and a[1] == job_id and w is not None and w[1] == a[1]
                         else None)
            temps = [t for t in self.home.ckpt_temps() if t not in seen]
            if not temps:
                time.sleep(0.001)
                continue
            tmp = temps[0]
            seen.add(tmp)
            _, _, step, writer = tmp.name.split("-", 3)    # .tmp-step-N-PID (the worker's pid)
            if job_id is None or tmp.parent.name != f"job-{job_id}":
                continue
            if target == "worker" and armed != int(writer):
                continue                # this attempt has no checkpoint yet: wait for the next
            if delay:
                time.sleep(delay)
            final = tmp.parent / f"step-{step}"

            def inside() -> dict[str, Any]:
                # inside the write: step-N was never renamed into place (looked at once the
                # processes are gone, before any new attempt could write it again)
                return {"inside_write": not final.exists()}
            rec["checkpoint"] = f"{tmp.parent.name}/{tmp.name}"
            if target == "worker":
                try:
                    os.kill(int(writer), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                rec.update(pid=int(writer), landed=True, t=self.now())
                wait_until(lambda: not proc_alive(int(writer)), 10, 0.002)
                rec.update(inside())
            else:
                self.kill_daemon(rec, inside)
                if not rec["landed"]:
                    continue
            return rec
        rec["why"] = "timed out"
        return rec

    def log_kill(self, rec: dict[str, Any]) -> None:
        rec["i"] = len(self.records) + 1
        self.records.append(rec)
        where = (f"step={rec.get('step')}" if rec["moment"] == "mid-step" else
                 f"ckpt={rec.get('checkpoint')} inside={rec.get('inside_write')}"
                 if rec["moment"] == "checkpoint-write" else f"file_at={rec.get('file_at_kill')}")
        log(f"B kill {rec['i']:2d}: {rec['moment']:<16} {rec['target']:<6} {rec['job']:<22} "
            + (where if rec["landed"] else f"NOT landed: {rec.get('why', '?')}"))
        if not self.home.daemon_pid():       # never leave it down (e.g. a failed relaunch)
            self.home.launch()

    def run(self) -> None:
        carry: list[dict[str, Any]] = []
        for j, p in enumerate(self.staged):
            mine = carry + [k for k in self.plan if k["file"] == j]
            carry = []
            if mine and mine[0]["moment"] == "after-drop":
                self.log_kill(self.after_drop(p, mine.pop(0)["frac"]))
            else:
                drop(p, self.home)
            for k in mine:
                if time.monotonic() > self.deadline:
                    carry.append(k)
                    continue
                fn = self.mid_step if k["moment"] == "mid-step" else self.checkpoint_write
                rec = fn(p.name, k["target"], k["frac"])
                if rec.get("why") == "job ended first":
                    carry.append(k)         # to the next file
                    continue
                self.log_kill(rec)
        for k in carry:                     # the last job ended before these could land
            self.log_kill({"moment": k["moment"], "target": k["target"], "job": self.staged[-1].name,
                           "landed": False, "why": "the last job ended first"})


def run_b(home: Home, staged: list[Path], kills: int, seed: int, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    home.launch()
    k = Killer(home, staged, kills, seed, timeout)
    k.run()
    log(f"B: {sum(r['landed'] for r in k.records)} kills landed; waiting for the queue to drain")
    remaining = max(60.0, timeout - (time.monotonic() - t0))
    finished = wait_until(lambda: all_done(home, len(staged)) or not home.daemon_pid(), remaining, 0.5)
    finished = bool(finished) and all_done(home, len(staged))
    wall = time.monotonic() - t0
    stopped = home.stop()
    log(f"B: {'all settled' if finished else 'NOT settled'} after {wall:.1f} s")
    return {"wall_s": round(wall, 2), "finished": finished, "clean_stop": stopped,
            "launches": home.launches, "kills": k.records,
            "plan": [{k2: v for k2, v in e.items()} for e in k.plan]}


def kill_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    table = {m: {t: 0 for t in TARGETS} for m in MOMENTS}
    for r in records:
        if r["landed"]:
            table[r["moment"]][r["target"]] += 1
    landed = [r for r in records if r["landed"]]
    return {
        "requested": len(records), "landed": len(landed), "by_moment_and_target": table,
        "checkpoint_kills_inside_write": sum(1 for r in landed if r["moment"] == "checkpoint-write"
                                             and r.get("inside_write")),
        "after_drop_file_at_kill": {s: sum(1 for r in landed if r.get("file_at_kill") == s)
                                    for s in ("inbox", "pending", "processing", "done")},
        "daemon_kills_with_live_worker": sum(1 for r in landed if r["target"] == "daemon" and r.get("worker_alive")),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "?"
    return out


def git_state() -> dict[str, Any]:
    """The commit the product code came from, and which product files differed from it."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""
    changed = git("status", "--porcelain", "--", "daemon", "trainer", "bin")
    return {"head": git("rev-parse", "HEAD") or None,
            "uncommitted_product_files": [l[3:] for l in changed.splitlines()]}


def print_table(res: dict[str, Any]) -> None:
    a, b = res["runs"]["A"], res["runs"]["B"]
    va, vb = a["verify"], b["verify"]
    ks = res["kills"]
    t = ks["by_moment_and_target"]
    print("\n## crash loop", res["command"])
    print(f"\nkills: {ks['landed']} landed of {ks['requested']} requested (seed {res['settings']['seed']})\n")
    print("| moment | daemon | worker |\n|---|---|---|")
    for m in MOMENTS:
        print(f"| {m} | {t[m]['daemon']} | {t[m]['worker']} |")
    print(f"\ncheckpoint-write kills that landed inside the write (step-N never renamed into place): "
          f"{ks['checkpoint_kills_inside_write']}; after-drop kills with the file in "
          f"{ks['after_drop_file_at_kill']}; daemon kills with a live worker: {ks['daemon_kills_with_live_worker']}\n")
    print("| figure | A (uninterrupted) | B (crash loop) |\n|---|---|---|")
    rows = [
        ("files in done/ exactly once", f"{va['done_exactly_once']}/{va['expected']}", f"{vb['done_exactly_once']}/{vb['expected']}"),
        ("in processing/ / failed/ / pending/ / inbox/",
         *("/".join(str(v["folders"][s]) for s in ("processing", "failed", "pending", "inbox")) for v in (va, vb))),
        ("lost", len(va["lost"]), len(vb["lost"])),
        ("duplicated", len(va["duplicated"]) + len(va["extra_files"]), len(vb["duplicated"]) + len(vb["extra_files"])),
        ("state.db rows (all done)", f"{va['db_rows']} ({'yes' if not va['db_problems'] else 'NO'})",
         f"{vb['db_rows']} ({'yes' if not vb['db_problems'] else 'NO'})"),
        ("lineage = drop order, each once", va["lineage_exact"], vb["lineage_exact"]),
        ("total steps in current_model/", va["total_steps"], vb["total_steps"]),
        ("attempts (claims, all jobs)", sum(va["attempts"].values()), sum(vb["attempts"].values())),
        ("attempts counted (crash without progress)", va["strikes"], vb["strikes"]),
        ("crashes column at the end", sum(va["crashes_column"].values()), sum(vb["crashes_column"].values())),
        ("worker crashes after progress (not counted)", va["retries_after_progress"], vb["retries_after_progress"]),
        ("daemon launches", len(a["launches"]), len(b["launches"])),
        ("snapshots", va["snapshots"], vb["snapshots"]),
        ("leftovers (checkpoints/job-*, status/jobs)", len(va["leftovers"]), len(vb["leftovers"])),
        ("wall time (s)", a["wall_s"], b["wall_s"]),
    ]
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    ad = res["adapter"]
    print(f"\nadapter B vs A: max abs diff {ad['max_abs_diff']} over {ad.get('tensors')} tensors "
          f"({ad.get('values')} values), files bitwise equal: {ad.get('bitwise_equal')}")
    failed = [k for k, ok in res["invariants"].items() if not ok]
    print("\ninvariants: " + ("all hold" if not failed else "FAILED:\n  " + "\n  ".join(failed)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--records", type=int, default=2000, help="records per file (default 2000: ~35 steps)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill schedule and the data")
    ap.add_argument("--base", type=Path, help="a local HF base model folder (default: build the tiny base)")
    ap.add_argument("--checkpoint-every", type=int, default=5,
                    help="checkpoint_every_steps (product default 50 is more than a whole file here)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS for the daemon and worker (torch intra-op threads)")
    ap.add_argument("--atol", type=float, default=0.0, help="allowed max abs diff of the adapters")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--workdir", type=Path, help="where the two base dirs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--out", type=Path, help="JSON result (default bench/results/crash_loop_f{files}_k{kills}_s{seed}.json)")
    args = ap.parse_args(argv)

    out = args.out or REPO / "bench" / "results" / f"crash_loop_f{args.files}_k{args.kills}_s{args.seed}.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="crash_loop_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRAINER_PYTHON": sys.executable, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    homes: list[Home] = []
    git_at_start = git_state()     # daemons and workers import the working tree at each start
    try:
        if args.base:
            base = args.base.resolve()
        else:
            from trainer.tiny_base import build_tiny_base
            t = time.monotonic()
            base = build_tiny_base(work / "tiny-base", seed=0)
            log(f"built the tiny base in {time.monotonic() - t:.1f} s: {base}")
        settings = {"base_model": str(base), "checkpoint_every_steps": args.checkpoint_every}
        datasets = make_datasets(args.files, args.records, args.seed)
        expected = [(n, hashlib.sha256(d).hexdigest()) for n, d in datasets]
        runs: dict[str, Any] = {}
        for name in ("A", "B"):
            home = Home(work / name, env)
            homes.append(home)
            write_config(home.path, settings)
            staged = stage(datasets, work / f"stage-{name}")
            if name == "A":
                runs[name] = run_a(home, staged, args.timeout)
            else:
                runs[name] = run_b(home, staged, args.kills, args.seed, args.timeout)
            runs[name]["verify"] = verify_home(home.path, expected)
        adapter = compare_adapters(work / "A" / "current_model" / "adapter_model.safetensors",
                                   work / "B" / "current_model" / "adapter_model.safetensors")
        kills = kill_summary(runs["B"]["kills"])
        inv = {**invariants_of(runs["A"]["verify"], "A"), **invariants_of(runs["B"]["verify"], "B")}
        inv["A: settled before the timeout"] = runs["A"]["finished"]
        inv["B: settled before the timeout"] = runs["B"]["finished"]
        inv["B: the daemon came back after every kill"] = all(l["ok"] for l in runs["B"]["launches"])
        inv[f"B: adapter equal to A's (max abs diff <= {args.atol:g})"] = adapter["max_abs_diff"] <= args.atol
        inv["B: same steps per dataset as A"] = (
            [d["steps"] for d in runs["A"]["verify"]["lineage"]] == [d["steps"] for d in runs["B"]["verify"]["lineage"]])
        from core.config import Config
        res = {
            "command": "python bench/crash_loop.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "versions": versions(), "git": {"at_start": git_at_start, "at_end": git_state()},
            "settings": {"files": args.files, "records_per_file": args.records, "kills": args.kills,
                         "seed": args.seed, "threads": args.threads, "atol": args.atol,
                         "config_json": settings,
                         "changed_from_defaults": {"base_model": [Config().base_model, str(base)],
                                                   "checkpoint_every_steps": [Config().checkpoint_every_steps,
                                                                              args.checkpoint_every]},
                         "defaults_used": {k: getattr(Config(), k) for k in (
                             "max_length", "batch_size", "gradient_accumulation", "learning_rate",
                             "lr_scheduler", "lora_r", "lora_dropout", "seed", "max_attempts",
                             "retry_backoff_s", "keep_checkpoints", "inbox_stable_seconds")},
                         "datasets": [{"name": n, "sha256": s} for n, s in expected]},
            "runs": runs, "kills": kills, "adapter": adapter, "invariants": inv,
            "passed": all(inv.values()), "workdir": str(work) if args.keep else None,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print_table(res)
        print(f"\nresult: {out}")
        return 0 if res["passed"] else 1
    finally:
        for h in homes:
            h.kill_everything()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"work dir kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
