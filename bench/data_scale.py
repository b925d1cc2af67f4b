#!/usr/bin/env python
"""Data preparation at real scale, measured through the running daemon (real processes).

One big ``messages`` file is generated (a system message, then two user/assistant turns per
record; ~470 tokens per record on average with the tiny base's tokenizer and chat template,
lognormal lengths with sigma 0.6; text is passages of the tiny base's corpus,
trainer/assets/corpus.txt, so the tokenizer sees real words), written to a staging file and
renamed into the inbox of a fresh base dir whose daemon was started with the real launcher
(bin/launch_training_daemon.sh). Then:

* **landing -> first step**: from the rename into inbox/ to the first ``step`` record in
  status/metrics.jsonl (the daemon stamps each record with ``time``). On the way, the moments
  the daemon accepted the file and claimed it (state.db events ``accepted``/``started``), the
  worker's ``preparing`` phases (status/training_status.json: validating, tokenizing done/total)
  and the trainer's own start (``total_steps`` appears in the status) are recorded, so the
  report shows where the time went. Polled every 0.1 s (the config asks the daemon to rewrite
  the status every 0.2 s).
* **peak RSS**: of the worker process tree (the daemon's ``trainer.worker`` child and its
  children, summed) and of the daemon alone, sampled every 0.2 s with psutil.
* **resume -> first step**: after the first ``checkpoint`` event (state.db), the daemon and the
  worker are SIGKILLed together, the daemon is started again with the launcher, and the time
  from that start to the next ``step`` record is measured the same way. Log lines that mention
  a cache (logs/training_output.log, logs/daemon_*.log) written after the restart are reported
  as found, with whether the resumed worker went through a tokenizing phase again.

Then the daemon is stopped (``trainer-ctl stop``) and the temp dir removed (``--keep`` keeps it).

    python bench/data_scale.py --records 100000            # bench/results/data_scale-100000.json
    python bench/data_scale.py --records 300 --max-length 128 --out /tmp/ds.json   # the smoke test
    python bench/data_scale.py --records 1000000 --generate-only   # generation speed alone
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LAUNCHER = REPO / "bin" / "launch_training_daemon.sh"
CORPUS_PATH = REPO / "trainer" / "assets" / "corpus.txt"
TARGET_TOKENS = 470          # mean tokens per record (chat template included)
LENGTH_SIGMA = 0.6           # lognormal sigma of the words per record
ROLES = ("system", "user", "assistant", "user", "assistant")
ROLE_SHARE = np.array([0.06, 0.16, 0.28, 0.16, 0.34])   # mean share of a record's words per message
ROLE_CONCENTRATION = 40.0    # Dirichlet concentration: how much the shares vary between records
POLL_S = 0.1
RSS_POLL_S = 0.2
MIB = 1 << 20

log = logging.getLogger("data_scale")


class BenchError(RuntimeError):
    """The benchmark cannot go on (timeout, daemon gone, launcher failed); the message says why."""


# ================================================================ the data
@dataclass(frozen=True)
class Corpus:
    """The corpus as one JSON-escaped byte blob (twice over, so a passage may wrap around) plus
    the JSON scaffolding between messages; passages are byte ranges of whole words."""
    blob: np.ndarray            # uint8: escaped words joined by single spaces, twice; then scaffolds
    word_start: np.ndarray      # int64 byte offset of word i in blob (i < 2 * n_words)
    word_end: np.ndarray        # int64 byte offset just past word i
    n_words: int
    scaffold_off: np.ndarray    # int64 offsets of the 6 scaffold pieces in blob
    scaffold_len: np.ndarray


def scaffold_pieces() -> list[bytes]:
    """The JSON text around the five contents: before the first, between each two, after the last."""
    opener = '{"messages": [{"role": "system", "content": "'
    between = ['"}, {"role": "%s", "content": "' % role for role in ROLES[1:]]
    return [s.encode() for s in (opener, *between, '"}]}\n')]


def load_corpus(path: Path = CORPUS_PATH) -> Corpus:
    words = path.read_text(encoding="utf-8").split()
    escaped = [json.dumps(w)[1:-1].encode() for w in words] * 2
    lengths = np.array([len(w) for w in escaped], dtype=np.int64)
    word_start = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))
    text = b" ".join(escaped)
    pieces = scaffold_pieces()
    scaffold_len = np.array([len(p) for p in pieces], dtype=np.int64)
    scaffold_off = len(text) + np.concatenate(([0], np.cumsum(scaffold_len)[:-1]))
    blob = np.frombuffer(text + b"".join(pieces), dtype=np.uint8)
    return Corpus(blob, word_start, word_start + lengths, len(words), scaffold_off, scaffold_len)


def draw_message_words(rng: np.random.Generator, n: int, mean_words: float, max_words: int) -> np.ndarray:
    """(n, 5) words per message: lognormal words per record (mean *mean_words*, sigma
    LENGTH_SIGMA) split over the five messages by Dirichlet shares; at least one word each."""
    mu = math.log(mean_words) - LENGTH_SIGMA ** 2 / 2
    total = rng.lognormal(mu, LENGTH_SIGMA, size=n)
    shares = rng.dirichlet(ROLE_SHARE * ROLE_CONCENTRATION, size=n)
    return np.clip(np.rint(total[:, None] * shares), 1, max_words).astype(np.int64)


def render_block(corpus: Corpus, rng: np.random.Generator, n: int, mean_words: float) -> bytes:
    """*n* JSONL records as bytes, in one vectorized gather.

    A record is 11 segments: scaffold, content, scaffold, ..., content, scaffold. A content is the
    passage of ``w`` words starting at a random word of the corpus: one byte range of the blob.
    """
    words = draw_message_words(rng, n, mean_words, corpus.n_words)
    first = rng.integers(0, corpus.n_words, size=(n, len(ROLES)))
    seg_off = np.empty((n, 11), dtype=np.int64)
    seg_len = np.empty((n, 11), dtype=np.int64)
    seg_off[:, 0::2] = corpus.scaffold_off
    seg_len[:, 0::2] = corpus.scaffold_len
    seg_off[:, 1::2] = corpus.word_start[first]
    seg_len[:, 1::2] = corpus.word_end[first + words - 1] - seg_off[:, 1::2]
    seg_off, seg_len = seg_off.ravel(), seg_len.ravel()
    out_start = np.cumsum(seg_len) - seg_len
    index = np.arange(int(seg_len.sum()), dtype=np.int64) + np.repeat(seg_off - out_start, seg_len)
    return corpus.blob[index].tobytes()


def write_records(path: Path, corpus: Corpus, n: int, mean_words: float, seed: int,
                  block: int = 8192) -> dict[str, Any]:
    """Write *n* records to *path* in blocks of *block* records; bytes, seconds and MB/s."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    written = 0
    with open(path, "wb", buffering=0) as fh:
        for start in range(0, n, block):
            data = render_block(corpus, rng, min(block, n - start), mean_words)
            fh.write(data)
            written += len(data)
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    return {"bytes": written, "mb": round(written / MIB, 1), "seconds": round(seconds, 2),
            "mb_per_s": round(written / MIB / seconds, 1) if seconds > 0 else None}


def record_tokens(tokenizer: Any, line: bytes) -> int:
    """Tokens of one record with the chat template, as the trainer sees it."""
    messages = json.loads(line)["messages"]
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
    return len(enc["input_ids"])


def record_words(line: bytes) -> int:
    return sum(len(m["content"].split()) for m in json.loads(line)["messages"])


def calibrate(corpus: Corpus, tokenizer: Any, seed: int, sample: int = 2000) -> dict[str, Any]:
    """Mean words per record that gives TARGET_TOKENS mean tokens: tokens = a + b * words is
    fitted on a sample, then checked on a fresh sample at the chosen mean."""
    fit_rng, check_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    lines = render_block(corpus, fit_rng, sample, 300.0).splitlines()
    words = np.array([record_words(x) for x in lines], dtype=float)
    tokens = np.array([record_tokens(tokenizer, x) for x in lines], dtype=float)
    b, a = np.polyfit(words, tokens, 1)
    mean_words = (TARGET_TOKENS - a) / b
    check = np.array([record_tokens(tokenizer, x)
                      for x in render_block(corpus, check_rng, sample, mean_words).splitlines()])
    return {"mean_words": round(float(mean_words), 1), "fit_tokens_per_word": round(float(b), 3),
            "fit_tokens_per_record_overhead": round(float(a), 1), "sample": sample,
            "tokens_mean": round(float(check.mean()), 1), "tokens_median": float(np.median(check)),
            "tokens_p90": float(np.percentile(check, 90)), "tokens_max": int(check.max())}


# ================================================================ the base dir and its processes
def proc_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Home:
    """A fresh base dir: config, the real launcher and trainer-ctl, the daemon's files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.env = {**os.environ, "TRAINER_HOME": str(path), "TRAINER_PYTHON": sys.executable,
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.env["PYTHONPATH"] = str(REPO) + (os.pathsep + self.env["PYTHONPATH"]
                                              if self.env.get("PYTHONPATH") else "")

    @property
    def inbox(self) -> Path:
        return self.path / "inbox"

    @property
    def metrics_file(self) -> Path:
        return self.path / "status" / "metrics.jsonl"

    def write_config(self, settings: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(json.dumps(settings, indent=2) + "\n")

    def launch(self) -> int:
        r = subprocess.run([str(LAUNCHER), "--home", str(self.path)], env=self.env, capture_output=True,
                           text=True, timeout=180)
        pid = self.daemon_pid()
        if r.returncode != 0 or pid is None:
            raise BenchError(f"the launcher failed (rc {r.returncode}): {(r.stdout + r.stderr)[-2000:]}")
        return pid

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops.ctl", "--home", str(self.path), *args],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def daemon_pid(self) -> int | None:
        try:
            pid = int((self.path / ".daemon.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if proc_alive(pid) else None

    def worker(self) -> psutil.Process | None:
        """The daemon's ``trainer.worker`` child, or None."""
        pid = self.daemon_pid()
        if pid is None:
            return None
        try:
            for child in psutil.Process(pid).children():
                if "trainer.worker" in child.cmdline():
                    return child
        except psutil.Error:
            pass
        return None

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "status" / "training_status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def events(self, since: float, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
        """state.db events of *kinds* at or after wall time *since*, oldest first (read-only)."""
        db = self.path / "status" / "state.db"
        if not db.exists():
            return []
        marks = ",".join("?" * len(kinds))
        for _ in range(20):
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                try:
                    conn.row_factory = sqlite3.Row
                    return [dict(r) for r in conn.execute(
                        f"SELECT ts, kind, job_id, message, data FROM events WHERE ts >= ? AND kind IN ({marks}) "
                        "ORDER BY id", (since, *kinds))]
                finally:
                    conn.close()
            except sqlite3.OperationalError:
                time.sleep(0.05)
        return []

    def metrics_size(self) -> int:
        try:
            return self.metrics_file.stat().st_size
        except FileNotFoundError:
            return 0

    def log_files(self) -> list[Path]:
        logs = self.path / "logs"
        return sorted(logs.glob("daemon_2*.log")) + [logs / "training_output.log"]

    def log_sizes(self) -> dict[str, int]:
        return {str(p): p.stat().st_size if p.exists() else 0 for p in self.log_files()}

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for p in self.log_files():
            if p.exists():
                out += [f"--- {p.name}"] + p.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)


class MetricsReader:
    """The ``step`` records appended to status/metrics.jsonl after a byte offset."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset, self._partial = path, offset, b""

    def first_step(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return None
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            rec = json.loads(line) if line.strip() else {}
            if rec.get("event") == "step":
                return rec
        return None


class RssSampler(threading.Thread):
    """Peak RSS of the worker tree (summed) and of the daemon, every RSS_POLL_S, per phase label.

    Listing children scans all of /proc (~4 ms), so the worker is looked up again only when the
    one known has ended, and its own children are listed once a second; reading an RSS is cheap.
    """

    CHILDREN_EVERY_S = 1.0

    def __init__(self, home: Home) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.home = home
        self.phase = "first"
        self.peaks: dict[str, dict[str, int]] = {}
        self._halt = threading.Event()
        self._worker: psutil.Process | None = None
        self._worker_tree: list[psutil.Process] = []
        self._tree_listed_at = 0.0

    def run(self) -> None:
        while not self._halt.wait(RSS_POLL_S):
            self.sample()

    def _current_tree(self) -> list[psutil.Process]:
        """The worker and its children (the children re-listed every CHILDREN_EVERY_S)."""
        if self._worker is None or not self._worker.is_running():
            self._worker, self._worker_tree = self.home.worker(), []
            self._tree_listed_at = 0.0
        if self._worker is not None and time.monotonic() - self._tree_listed_at > self.CHILDREN_EVERY_S:
            self._worker_tree = [self._worker, *self._worker.children(recursive=True)]
            self._tree_listed_at = time.monotonic()
        return self._worker_tree

    def sample(self) -> None:
        daemon_rss = worker_rss = 0
        pid = self.home.daemon_pid()
        try:
            if pid is not None:
                daemon_rss = psutil.Process(pid).memory_info().rss
            for proc in self._current_tree():
                worker_rss += proc.memory_info().rss
        except psutil.Error:      # a process ended between the listing and the reading
            self._tree_listed_at = 0.0
        peak = self.peaks.setdefault(self.phase, {"worker": 0, "daemon": 0})
        peak["worker"] = max(peak["worker"], worker_rss)
        peak["daemon"] = max(peak["daemon"], daemon_rss)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def peak_mb(self, who: str, phase: str | None = None) -> float:
        phases = [phase] if phase else list(self.peaks)
        return round(max((self.peaks.get(p, {}).get(who, 0) for p in phases), default=0) / MIB, 1)


# ================================================================ measuring
@dataclass
class Timeline:
    """Seconds from *t0* (wall clock) to each moment first seen, and the preparing phases as seen.

    Moments: ``accepted`` (the daemon took the file into the queue), ``claimed`` (it started a
    worker for it), ``validating`` / ``tokenizing`` (the worker's preparing phases, first seen in
    the status), ``tokenized`` (tokenizing done == total), ``trainer_started`` (``total_steps``
    in the status: data and model ready), ``first_step`` (the metrics record's own time); on a
    restart also ``daemon_start``, ``reconciled`` and ``launcher_returned``."""
    t0: float
    moments: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    first_step: dict[str, Any] | None = None

    def mark(self, name: str, at: float | None = None) -> None:
        if name not in self.moments:
            self.moments[name] = round((at if at is not None else time.time()) - self.t0, 2)

    def see_status(self, status: dict[str, Any]) -> None:
        prep = status.get("preparing") or {}
        phase = prep.get("phase")
        if phase:
            self.mark(phase)
            self.phases[phase] = {"first_seen_s": self.moments[phase],
                                  **{k: prep.get(k) for k in ("done", "total", "records_per_second")}}
            if phase == "tokenizing" and prep.get("total") and (prep.get("done") or 0) >= prep["total"]:
                self.mark("tokenized")
        if status.get("current_job_id") is not None and status.get("total_steps") is not None:
            self.mark("trainer_started")

    def to_json(self) -> dict[str, Any]:
        return {"moments_s": dict(sorted(self.moments.items(), key=lambda kv: kv[1])), "preparing": self.phases,
                "first_step": self.first_step}


def wait_first_step(home: Home, t0: float, metrics_offset: int, deadline: float, what: str) -> Timeline:
    """Poll the status, state.db and metrics.jsonl until the first step after *metrics_offset*."""
    timeline = Timeline(t0)
    reader = MetricsReader(home.metrics_file, metrics_offset)
    last_report = time.monotonic()
    while True:
        status = home.status()
        timeline.see_status(status)
        step = reader.first_step()
        if step is not None:
            timeline.first_step = {k: step.get(k) for k in ("step", "total_steps", "loss", "tokens_per_second")}
            timeline.mark("first_step", step["time"])
            break
        if home.daemon_pid() is None:
            raise BenchError(f"{what}: the daemon is gone\n{home.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: no step after {time.time() - t0:.0f} s (--timeout-s); status "
                             f"{status.get('status')}, preparing {status.get('preparing')}, last error "
                             f"{status.get('last_error')}\n{home.log_tail()}")
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            log.info("%s: %.0f s, status %s, preparing %s", what, time.time() - t0, status.get("status"),
                     status.get("preparing"))
        time.sleep(POLL_S)
    for ev in home.events(t0, ("daemon_start", "reconciled", "accepted", "started")):
        timeline.mark(ev["kind"] if ev["kind"] != "started" else "claimed", ev["ts"])
    return timeline


def wait_checkpoint(home: Home, since: float, deadline: float) -> dict[str, Any]:
    """The first ``checkpoint`` event at or after *since* (its step is in ``data``)."""
    while time.monotonic() < deadline:
        evs = home.events(since, ("checkpoint",))
        if evs:
            data = json.loads(evs[0]["data"] or "{}")
            return {"step": data.get("step"), "at_s": round(evs[0]["ts"] - since, 2)}
        if home.daemon_pid() is None:
            raise BenchError(f"waiting for a checkpoint: the daemon is gone\n{home.log_tail()}")
        time.sleep(POLL_S)
    raise BenchError(f"no checkpoint event before --timeout-s\n{home.log_tail()}")


def kill_daemon_and_worker(home: Home) -> dict[str, Any]:
    """SIGKILL the daemon and its worker together; wait until both are gone."""
    pid = home.daemon_pid()
    worker = home.worker()
    victims = [p for p in (pid, worker.pid if worker else None) if p]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while any(proc_alive(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"daemon_pid": pid, "worker_pid": worker.pid if worker else None,
            "all_gone": not any(proc_alive(p) for p in victims)}


def cache_lines_since(home: Home, sizes: dict[str, int], limit: int = 20) -> list[str]:
    """Log lines written after *sizes* (byte offsets per log file) that mention a cache."""
    found: list[str] = []
    for p in home.log_files():
        if not p.exists():
            continue
        with open(p, "rb") as fh:
            fh.seek(sizes.get(str(p), 0))
            text = fh.read().decode(errors="replace")
        found += [f"{p.name}: {line.strip()}" for line in text.splitlines() if "cache" in line.lower()]
    return found[:limit]


def stop_daemon(home: Home, timeout: float = 180) -> bool:
    """``trainer-ctl stop``, then wait; SIGKILL (daemon and worker) if it does not end in time."""
    pid = home.daemon_pid()
    if pid is None:
        return True
    home.ctl("stop")
    deadline = time.monotonic() + timeout
    while proc_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc_alive(pid):
        kill_daemon_and_worker(home)
        return False
    return True


# ================================================================ report
def machine_facts() -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers

    return {"cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "numpy": np.__version__, "platform": platform.platform()}


def code_version() -> dict[str, Any]:
    """The commit the daemon and worker ran from, and uncommitted changes to daemon/ and trainer/
    (None where REPO is not a git checkout, e.g. an exported tree)."""
    def git(*a: str) -> str | None:
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.rstrip() if r.returncode == 0 else None

    changes = git("status", "--porcelain", "--", "daemon", "trainer")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": None if changes is None else changes.splitlines()}


def phases_text(t: dict[str, Any]) -> str:
    """``accepted 0.4 · validating 9.0 · tokenizing 9.6 (300/300) · ...`` in moment order."""
    parts = []
    for name, s in t["moments_s"].items():
        prep = t["preparing"].get(name)
        extra = f" ({prep['done']}/{prep['total']})" if prep and prep.get("total") else ""
        parts.append(f"{name} {s:g}{extra}")
    return " · ".join(parts)


def markdown_table(r: dict[str, Any]) -> str:
    m = r["machine"]
    machine = (f"{m['cpu_count']} CPUs, python {m['python']}, torch {m['torch']}, transformers "
               f"{m['transformers']}, tokenizers {m['tokenizers']}")
    rows = [("records", f"{r['records']:,}"), ("file MB", f"{r['file_mb']:,}"),
            ("mean tokens/record (sample)", f"{r['calibration']['tokens_mean']}"),
            ("landing → first step s", f"{r['landing_to_first_step_s']}"),
            ("phases (s after landing)", phases_text(r["first_run"])),
            ("peak worker RSS MB", f"{r['peak_worker_rss_mb']:,}"),
            ("peak daemon RSS MB", f"{r['peak_daemon_rss_mb']:,}"),
            ("resume → first step s", f"{r['resume_to_first_step_s']}"),
            ("resume phases (s after restart)", phases_text(r["resume_run"])),
            ("cache lines after restart", str(len(r["cache_lines_after_restart"]))),
            ("machine", machine)]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


# ================================================================ the run
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=3600.0,
                    help="give up (exit 1, with the daemon's state) when a wait takes longer than this in all")
    ap.add_argument("--out", type=Path, help="JSON result (default bench/results/data_scale-<N>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (base dir, data, logs)")
    ap.add_argument("--until-tokenized", action="store_true",
                    help="after the resume, go on training until the whole file is tokenized (the worker "
                         "logs 'tokenized N lines'), sampling RSS all along: memory over the whole file")
    ap.add_argument("--generate-only", action="store_true",
                    help="only generate the file (timed) into the temp dir, and stop there")
    args = ap.parse_args(argv)
    args.out = args.out or REPO / "bench" / "results" / f"data_scale-{args.records}.json"
    return args


def build_base_and_tokenizer(base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    from trainer.tiny_base import build_tiny_base

    t = time.monotonic()
    build_tiny_base(base_dir, seed=0)
    log.info("built the tiny base in %.1f s: %s", time.monotonic() - t, base_dir)
    return AutoTokenizer.from_pretrained(str(base_dir))


def generate(work: Path, args: argparse.Namespace, tokenizer: Any) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    corpus = load_corpus()
    calib = calibrate(corpus, tokenizer, args.seed)
    log.info("calibration: %.1f words/record -> %.1f tokens/record (median %g, p90 %g)",
             calib["mean_words"], calib["tokens_mean"], calib["tokens_median"], calib["tokens_p90"])
    staging = work / "staging"
    staging.mkdir(exist_ok=True)
    path = staging / f"data_scale-{args.records}.jsonl"
    gen = write_records(path, corpus, args.records, calib["mean_words"], args.seed)
    log.info("generated %d records, %.1f MB in %.2f s (%.0f MB/s): %s", args.records, gen["mb"],
             gen["seconds"], gen["mb_per_s"], path)
    return path, calib, gen


def wait_tokenized(home: Home, sampler: "RssSampler", since: float, deadline: float) -> dict[str, Any]:
    """Train on until the worker logs that the whole file is tokenized; RSS sampled meanwhile."""
    sampler.phase = "rest_of_file"
    log_file = home.path / "logs" / "training_output.log"
    start = log_file.stat().st_size
    while time.monotonic() < deadline:
        with open(log_file, "rb") as fh:
            fh.seek(start)
            for line in fh.read().decode(errors="replace").splitlines():
                if "tokenized" in line and " lines in " in line:
                    sampler.sample()
                    log.info("%s", line.strip())
                    return {"seconds_after_restart": round(time.time() - since, 1), "line": line.strip(),
                            "peak_worker_rss_mb": sampler.peak_mb("worker", "rest_of_file")}
        time.sleep(2.0)
    raise TimeoutError("the whole file was not tokenized before --timeout-s")


def measure(home: Home, staged: Path, deadline: float, until_tokenized: bool = False) -> dict[str, Any]:
    """Land the file, time it to the first step; checkpoint, kill, restart, time the resume."""
    sampler = RssSampler(home)
    home.launch()
    sampler.start()
    cpu0 = psutil.Process().cpu_times()
    try:
        landing = time.time()
        os.rename(staged, home.inbox / staged.name)
        log.info("landed %s in inbox/; waiting for the first step", staged.name)
        first = wait_first_step(home, landing, 0, deadline, "landing -> first step")
        log.info("first step %.2f s after landing", first.moments["first_step"])
        ckpt = wait_checkpoint(home, landing, deadline)
        log.info("checkpoint at step %s; SIGKILL daemon and worker", ckpt["step"])
        killed = kill_daemon_and_worker(home)
        sizes, metrics_offset = home.log_sizes(), home.metrics_size()
        sampler.phase = "resume"
        restart = time.time()
        home.launch()
        launcher_s = round(time.time() - restart, 2)
        resumed = wait_first_step(home, restart, metrics_offset, deadline, "resume -> first step")
        resumed.mark("launcher_returned", restart + launcher_s)
        log.info("first step %.2f s after the restart", resumed.moments["first_step"])
        sampler.sample()
        rest = wait_tokenized(home, sampler, restart, deadline) if until_tokenized else None
    finally:
        sampler.stop()
    cpu1 = psutil.Process().cpu_times()
    bench_cpu_s = round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 2)
    clean = stop_daemon(home)
    return {"first": first, "resumed": resumed, "checkpoint": ckpt, "killed": killed, "sampler": sampler,
            "cache_lines": cache_lines_since(home, sizes), "clean_stop": clean, "rest_of_file": rest,
            "bench_cpu_s": bench_cpu_s, "measured_s": round(time.time() - landing, 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="data_scale-"))
    log.info("work dir %s", work)
    deadline = time.monotonic() + args.timeout_s
    home = Home(work / "home")
    try:
        base = home.path / "consolidated_models" / "tiny-base"
        tokenizer = build_base_and_tokenizer(base)
        staged, calib, gen = generate(work, args, tokenizer)
        if args.generate_only:
            return {"records": args.records, "file_mb": gen["mb"], "generation": gen, "calibration": calib}
        settings = {"base_model": str(base), "max_length": args.max_length, "batch_size": 4,
                    "checkpoint_every_steps": 2, "eval_fraction": 0.0, "status_interval_s": 0.2}
        home.write_config(settings)
        m = measure(home, staged, deadline, args.until_tokenized)
    finally:
        if home.daemon_pid() is not None:
            kill_daemon_and_worker(home)
        if args.keep:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    first, resumed, sampler = m["first"].to_json(), m["resumed"].to_json(), m["sampler"]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code": code_version(),
        "records": args.records, "file_mb": gen["mb"], "file_bytes": gen["bytes"], "generation": gen,
        "calibration": calib, "settings": {"seed": args.seed, "config_json": settings},
        "landing_to_first_step_s": first["moments_s"]["first_step"], "first_run": first,
        "checkpoint": m["checkpoint"], "killed": m["killed"],
        "resume_to_first_step_s": resumed["moments_s"]["first_step"], "resume_run": resumed,
        "resume_retokenized": "tokenizing" in resumed["preparing"],
        "cache_lines_after_restart": m["cache_lines"],
        "peak_worker_rss_mb": sampler.peak_mb("worker"), "peak_daemon_rss_mb": sampler.peak_mb("daemon"),
        "peak_rss_mb_by_run": {p: {k: round(v / MIB, 1) for k, v in d.items()} for p, d in sampler.peaks.items()},
        "clean_stop": m["clean_stop"], "rest_of_file": m["rest_of_file"],
        "bench_own_cpu": {"cpu_s": m["bench_cpu_s"], "over_s": m["measured_s"]},   # polling overhead
        "machine": machine_facts(),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchError as exc:
        log.error("data_scale: %s", exc)
        return 1
    if args.generate_only:
        print(json.dumps(result, indent=2))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + markdown_table(result) + "\n")
    if result["cache_lines_after_restart"]:
        print("cache lines after the restart:\n  " + "\n  ".join(result["cache_lines_after_restart"]))
    print(f"resumed worker tokenized again: {'yes' if result['resume_retokenized'] else 'no'}")
    print(f"result: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
