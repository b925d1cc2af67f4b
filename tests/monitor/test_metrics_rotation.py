"""metrics.jsonl rotated by size (daemon/status.py) and read back by the dashboard
(monitor/readers.py MetricsIndex): the whole retained history, in order, with seqs that keep
increasing across rotations and a since_seq cursor that stays valid. The real writer (StatusBoard)
and the real reader on real files; then a real daemon and a real monitor over HTTP and SSE."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path


from core.paths import Layout
from daemon.status import StatusBoard, metrics_files
from daemon_helpers import text_records, wait_for, write_jsonl
from monitor.metrics_index import MetricsIndex
from monitor_helpers import Monitor, SSEReader, make_home, prometheus_samples, stop_daemon

KIB = 1024


def _board(home: Path, max_kib: float, keep: int) -> StatusBoard:
    layout = Layout(home)
    layout.ensure()
    return StatusBoard(layout, metrics_max_mb=max_kib / 1024, metrics_keep_files=keep)


def _on_disk(layout: Layout) -> list[dict]:
    """The retained history as the files hold it, oldest first (every line must be whole JSON)."""
    out = []
    for p in metrics_files(layout.metrics_file):
        data = p.read_bytes()
        assert not data or data.endswith(b"\n"), f"{p.name} ends in a torn line"
        out += [json.loads(line) for line in data.splitlines()]
    return out


def _flushed(board: StatusBoard) -> None:
    board.flush(force=True)                  # what the daemon does every tick
    assert board.write_error is None


def _strip(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seq"} for r in recs]


def test_index_follows_many_rotations_with_a_cursor_that_never_repeats_or_skips(tmp_path: Path) -> None:
    board = _board(tmp_path / "h", max_kib=2, keep=3)
    layout = board.layout
    idx = MetricsIndex(layout.metrics_file)
    rng = random.Random(7)
    cursor, seen, written = -1, [], 0
    for burst in range(60):
        for _ in range(rng.randint(0, 25)):          # 0..25 steps between two dashboard polls
            written += 1
            board.append_metric({"event": "step", "job_id": 1 + written // 200, "step": written,
                                 "loss": rng.random(), "note": "n" * rng.randint(0, 120)})
        _flushed(board)
        q = idx.query(since_seq=cursor, limit=100000)
        assert q.generation == 0, f"a rotation must not look like a new file (poll {burst})"
        seen += q.records
        cursor = q.next_seq
        assert q.total == written, "seq counts every record ever indexed, rotated out or not"
        # the window a chart asks for: exactly the files' content, in order, seqs consecutive
        window = idx.query(limit=100000).records
        assert _strip(window) == _on_disk(layout)
        assert [r["seq"] for r in window] == list(range(written - len(window), written))
    board.close()
    files = sorted(p.name for p in layout.status_dir.glob("metrics.jsonl*"))
    assert files == ["metrics.jsonl", "metrics.jsonl.1", "metrics.jsonl.2", "metrics.jsonl.3"]
    assert all(p.stat().st_size <= 2 * KIB for p in layout.status_dir.glob("metrics.jsonl*"))
    # the follower saw every record exactly once, in order, though most were rotated out since
    assert [r["seq"] for r in seen] == list(range(written))
    assert [r["step"] for r in seen] == list(range(1, written + 1))
    assert len(_on_disk(layout)) < written / 4


def test_lines_written_just_before_a_rotation_are_not_lost(tmp_path: Path) -> None:
    """The reader indexed part of metrics.jsonl; more lines went in, then it was rotated and a new
    file started, all between two polls: the late lines belong to the older file."""
    board = _board(tmp_path / "h", max_kib=1, keep=2)
    idx = MetricsIndex(board.layout.metrics_file)
    step = 0

    def add(n: int) -> None:
        nonlocal step
        for _ in range(n):
            step += 1
            board.append_metric({"event": "step", "job_id": 1, "step": step, "pad": "p" * 60})
        _flushed(board)

    add(3)
    assert idx.refresh() == 3
    files_before = len(metrics_files(board.layout.metrics_file))
    add(6)                                    # fills metrics.jsonl, rotates it, starts a new one
    assert len(metrics_files(board.layout.metrics_file)) == files_before + 1
    q = idx.query(limit=1000)
    assert [(r["seq"], r["step"]) for r in q.records] == [(i, i + 1) for i in range(9)]
    assert q.generation == 0


def test_everything_known_rotated_away_between_two_polls_starts_over_with_a_new_generation(tmp_path: Path) -> None:
    board = _board(tmp_path / "h", max_kib=1, keep=1)
    idx = MetricsIndex(board.layout.metrics_file)
    for s in range(1, 6):
        board.append_metric({"event": "step", "job_id": 1, "step": s, "pad": "p" * 60})
    _flushed(board)
    assert idx.refresh() == 5 and idx.generation == 0
    for s in range(6, 80):                    # many rotations: every file the reader held is gone
        board.append_metric({"event": "step", "job_id": 1, "step": s, "pad": "p" * 60})
    _flushed(board)
    q = idx.query(limit=1000)
    assert q.generation == 1, "the old cursor cannot be continued: say so"
    assert _strip(q.records) == _on_disk(board.layout) and q.records[-1]["step"] == 79
    board.close()


def test_truncating_or_replacing_a_file_bumps_the_generation_and_reads_what_is_there(tmp_path: Path) -> None:
    board = _board(tmp_path / "h", max_kib=1, keep=2)
    layout = board.layout
    for s in range(1, 30):
        board.append_metric({"event": "step", "job_id": 1, "step": s, "pad": "p" * 60})
    board.close()
    idx = MetricsIndex(layout.metrics_file)
    idx.refresh()
    assert idx.generation == 0 and _strip(idx.query(limit=1000).records) == _on_disk(layout)

    # someone empties a rotated file by hand
    (layout.status_dir / "metrics.jsonl.1").write_text("")
    q = idx.query(limit=1000)
    assert q.generation == 1 and _strip(q.records) == _on_disk(layout)
    # the current file is replaced (a restored backup: a new inode)
    tmp = layout.status_dir / "restore.tmp"
    tmp.write_text(json.dumps({"event": "step", "job_id": 9, "step": 1, "time": 1.0}) + "\n")
    os.replace(tmp, layout.metrics_file)
    q = idx.query(limit=1000)
    assert q.generation == 2 and _strip(q.records) == _on_disk(layout)
    assert q.records[-1]["job_id"] == 9
    # all removed: an empty history, yet another generation
    for p in metrics_files(layout.metrics_file):
        p.unlink()
    q = idx.query(limit=1000)
    assert q.generation == 3 and q.records == [] and q.total == 0


def test_a_daemon_restart_appends_and_keep_files_lowered_drops_the_oldest(tmp_path: Path) -> None:
    home = tmp_path / "h"
    board = _board(home, max_kib=1, keep=4)
    idx = MetricsIndex(board.layout.metrics_file)
    for s in range(1, 40):
        board.append_metric({"event": "step", "job_id": 1, "step": s, "pad": "p" * 60})
    board.close()
    n = idx.refresh()
    assert len(metrics_files(board.layout.metrics_file)) == 5
    board = _board(home, max_kib=1, keep=4)        # the next daemon: same files, same cursor
    board.append_metric({"event": "step", "job_id": 2, "step": 1, "pad": "p" * 60})
    _flushed(board)
    q = idx.query(since_seq=n - 1)
    assert [(r["seq"], r["job_id"]) for r in q.records] == [(n, 2)] and q.generation == 0
    board.set_metrics_retention(1 / 1024, 1)       # config.json edited: keep one rotated file
    cursor, followed = n, []
    for s in range(2, 30):                         # a dashboard polling every step
        board.append_metric({"event": "step", "job_id": 2, "step": s, "pad": "p" * 60})
        _flushed(board)
        q = idx.query(since_seq=cursor, limit=1000)
        followed += q.records
        cursor = q.next_seq
        assert q.generation == 0
    board.close()
    names = sorted(p.name for p in board.layout.status_dir.glob("metrics.jsonl*"))
    assert names == ["metrics.jsonl", "metrics.jsonl.1"]
    assert [(r["seq"], r["step"]) for r in followed] == [(n + i, s) for i, s in enumerate(range(2, 30), 1)]
    assert _strip(idx.query(limit=1000).records) == _on_disk(board.layout)


def test_a_line_torn_by_a_crash_does_not_swallow_the_next_daemons_first_record(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "h")
    layout.ensure()
    whole = json.dumps({"event": "step", "job_id": 1, "step": 1, "time": 1.0}) + "\n"
    layout.metrics_file.write_text(whole + '{"event": "step", "job_id": 1, "st')   # killed mid-write
    board = StatusBoard(layout, metrics_max_mb=1 / 1024, metrics_keep_files=2)
    for s in range(2, 12):
        board.append_metric({"event": "step", "job_id": 2, "step": s, "pad": "p" * 60})
    board.close()
    idx = MetricsIndex(layout.metrics_file)
    assert [(r["job_id"], r["step"]) for r in idx.query().records] == [(1, 1)] + [(2, s) for s in range(2, 12)]
    assert idx.skipped_lines == 1                        # only the torn fragment itself


# ---- a real daemon, a real monitor ---------------------------------------------------------------
def test_dashboard_reads_the_whole_history_while_the_daemon_rotates(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", metrics_max_mb=0.01, metrics_keep_files=2, standin_step_seconds=0.02)
    mon = Monitor(home.path).start()
    stream = SSEReader(mon.base + "/api/stream").start()
    try:
        write_jsonl(home.path / "inbox/a.jsonl", text_records(120, "a"))
        write_jsonl(home.path / "inbox/b.jsonl", text_records(120, "b"))
        home.launch()
        cursor, followed, gens = -1, [], set()
        with mon.client() as c:
            def poll() -> bool:
                nonlocal cursor
                r = c.get("/api/metrics", params={"since_seq": cursor, "limit": 20000}).json()
                gens.add(r["generation"])
                followed.extend(r["records"])
                cursor = r["next_seq"]
                return len(home.files("done")) == 2 and r["total"] == 240 and not r["more"]
            wait_for(poll, timeout=60, interval=0.05, what="both jobs trained and followed")
            stop_daemon(home)
            layout = Layout(home.path)
            assert len(metrics_files(layout.metrics_file)) == 3     # current + keep 2 rotated
            retained = _on_disk(layout)
            assert len(retained) < 240
            assert gens == {0}, "rotations never restarted the history"
            assert [r["seq"] for r in followed] == list(range(240))
            assert [(r["job_id"], r["step"]) for r in followed] == \
                [(1, s) for s in range(1, 121)] + [(2, s) for s in range(1, 121)]
            # a chart opened now: the whole retained history, in order, the newest seqs
            r = c.get("/api/metrics", params={"limit": 20000}).json()
            assert _strip(r["records"]) == retained and r["total"] == 240
            assert [x["seq"] for x in r["records"]] == list(range(240 - len(retained), 240))
            # an old cursor pointing into rotated-out records: everything retained after it
            r = c.get("/api/metrics", params={"since_seq": 10, "limit": 20000}).json()
            assert _strip(r["records"]) == retained
            prom = prometheus_samples(c.get("/metrics").text)
            assert prom["trainer_metrics_history_records"] == {(): len(retained)}
            assert prom["trainer_steps_total"] == {(): 240}      # what the rotated-out files held too
        # the live stream: every record once, in order, across the rotations
        wait_for(lambda: sum(len(d["records"]) for _, d in stream.of("metrics")) >= 240, timeout=10,
                 what="the stream caught up")
        batches = [d for _, d in stream.of("metrics")]
        assert not any(d["reset"] for d in batches[1:]), "a rotation reset the dashboard's chart"
        streamed = [x for d in batches for x in d["records"]]
        assert [x["seq"] for x in streamed] == list(range(240))
    finally:
        stream.stop()
        mon.stop()
        home.kill_all()
