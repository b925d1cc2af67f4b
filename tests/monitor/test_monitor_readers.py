"""The monitor's tolerant file readers on real files (no server)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from monitor.metrics_index import MetricsIndex
from monitor.readers import JsonFileReader, LogFollower, tail_lines


def rec(step: int, job: int = 1, **kw) -> str:
    return json.dumps({"time": 1000.0 + step, "step": step, "job_id": job, "loss": 1.0 / step, **kw}) + "\n"


def test_metrics_index_is_incremental_and_waits_for_torn_lines(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    idx = MetricsIndex(p)
    assert idx.refresh() == 0 and idx.query().records == []
    p.write_text(rec(1) + rec(2) + rec(3)[:10])
    assert idx.refresh() == 2
    with open(p, "a") as fh:
        fh.write(rec(3)[10:] + "garbage\n" + "[1, 2]\n" + "\n" + rec(4))
    assert idx.refresh() == 4 and idx.skipped_lines == 2
    q = idx.query(limit=2)
    assert [r["step"] for r in q.records] == [3, 4] and q.more and q.next_seq == 3
    q = idx.query(since_seq=0, limit=2)
    assert [r["seq"] for r in q.records] == [1, 2] and q.more and q.next_seq == 2
    q = idx.query(since_seq=q.next_seq)
    assert [r["step"] for r in q.records] == [4] and not q.more
    assert [r["step"] for r in idx.query(since_step=2).records] == [3, 4]


def test_metrics_index_filters_by_job_and_restarts_on_replace(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text(rec(1, 1) + rec(2, 1) + rec(1, 2) + rec(2, 2) + rec(3, 2))
    idx = MetricsIndex(p)
    assert [r["step"] for r in idx.query(job_id=2, since_step=1).records] == [2, 3]
    assert idx.latest_job() == 2
    gen = idx.generation
    tmp = tmp_path / "new.jsonl"
    tmp.write_text(rec(7, 3))
    os.replace(tmp, p)                       # a new file (new inode): index it from scratch
    assert idx.refresh() == 1 and idx.generation == gen + 1
    assert [r["step"] for r in idx.query().records] == [7]
    p.write_text("")                         # truncated
    assert idx.refresh() == 0


def test_metrics_index_of_a_large_file_reads_only_what_it_returns(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    with open(p, "w") as fh:
        for i in range(1, 50001):
            fh.write(rec(i, pad="x" * 100))
    idx = MetricsIndex(p)
    assert idx.refresh() == 50000
    q = idx.query(limit=10)
    assert [r["step"] for r in q.records] == list(range(49991, 50001))
    with open(p, "a") as fh:
        fh.write(rec(50001))
    assert idx.refresh() == 50001
    assert idx.since(49999) == [dict(json.loads(rec(50001)), seq=50000)]


def test_json_reader_keeps_last_good_value(tmp_path: Path) -> None:
    p = tmp_path / "training_status.json"
    r = JsonFileReader(p)
    value, reason = r.read()
    assert value is None and "does not exist" in reason
    p.write_text(json.dumps({"status": "training", "current_step": 5}))
    assert r.read() == ({"status": "training", "current_step": 5}, None)
    p.write_text('{"status": "pau')          # a torn write (only a non-atomic writer makes one)
    value, reason = r.read()
    assert value == {"status": "training", "current_step": 5} and "unreadable" in reason
    tmp = tmp_path / ".tmp"
    tmp.write_text(json.dumps({"status": "paused"}))
    os.replace(tmp, p)
    assert r.read() == ({"status": "paused"}, None)


def test_tail_and_follow(tmp_path: Path) -> None:
    p = tmp_path / "daemon_20260101.log"
    p.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert tail_lines(p, 3) == ["line 997", "line 998", "line 999"]
    assert tail_lines(tmp_path / "missing.log", 3) == []
    f = LogFollower()
    lines, reset = f.poll(p, initial_lines=2)
    assert reset and lines == ["line 998", "line 999"]
    assert f.poll(p) is None
    with open(p, "a") as fh:
        fh.write("new 1\nnew 2 (part")
    assert f.poll(p) == (["new 1"], False)
    with open(p, "a") as fh:
        fh.write("ial)\n")
    assert f.poll(p) == (["new 2 (partial)"], False)
    p.write_text("rotated\n")
    assert f.poll(p) == (["rotated"], True)
    g = LogFollower()
    assert g.poll(None) == ([], True) and g.poll(None) is None
