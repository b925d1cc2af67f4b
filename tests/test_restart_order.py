"""First in, first out across restarts: files left in inbox/ while the daemon was down go first,
in arrival order (mtime, then name), before anything that arrives after the start."""
from __future__ import annotations

import json
import os
import time

from daemon_helpers import text_records, wait_for, write_jsonl


def _queue_order(home) -> list[str]:
    jobs = json.loads(home.ctl("queue", "list", "--json").stdout)
    return [j["name"] for j in sorted(jobs, key=lambda j: j["id"])]


def _drop_while_stopped(home, names_by_mtime: list[str], first_mtime: float, step: float = 0.05) -> None:
    for i, name in enumerate(names_by_mtime):
        path = write_jsonl(home.path / "inbox" / name, text_records(2, name))
        t = first_mtime + i * step
        os.utime(path, (t, t))


def test_files_left_while_stopped_go_first_in_arrival_order_even_if_still_settling(home, tmp_path):
    # the five arrived just before the start, so they still wait out the stability interval;
    # a sixth renamed in right after the start is complete at once but must not overtake them
    home.write_config(inbox_stable_seconds=5.0)
    arrival = ["e.jsonl", "c.jsonl", "a.jsonl", "d.jsonl", "b.jsonl"]        # not name order
    t0 = time.time()
    _drop_while_stopped(home, arrival, t0 - 0.5)
    home.launch()
    later = write_jsonl(tmp_path / "0-later.jsonl", text_records(2, "later"))
    os.utime(later, (t0 - 3600, t0 - 3600))          # older mtime, but it arrives after the start
    os.rename(later, home.path / "inbox/0-later.jsonl")
    time.sleep(0.6)
    if time.time() - t0 < 4.0:                        # the five are still settling: nothing taken
        assert sorted(os.listdir(home.path / "inbox")) == sorted(arrival + ["0-later.jsonl"])
    wait_for(lambda: len(home.files("done")) == 6, timeout=30, what="all six done")
    assert _queue_order(home) == arrival + ["0-later.jsonl"]


def test_old_files_found_at_start_are_taken_at_once_in_mtime_order(home, tmp_path):
    # older than the stability interval and closed: complete, no second wait after a restart
    home.write_config(inbox_stable_seconds=30.0)
    arrival = ["b.jsonl", "d.jsonl", "a.jsonl", "e.jsonl", "c.jsonl"]
    base = time.time() - 3600
    _drop_while_stopped(home, arrival, base, step=1.0)
    t = base + 2 * 1.0                                # same mtime as a.jsonl: the name decides
    os.utime(write_jsonl(home.path / "inbox/0-tie.jsonl", text_records(2, "tie")), (t, t))
    home.launch()
    later = write_jsonl(tmp_path / "later.jsonl", text_records(2, "later"))
    os.rename(later, home.path / "inbox/later.jsonl")
    wait_for(lambda: len(home.files("done")) == 7, timeout=20, what="all done well before 30 s")
    assert _queue_order(home) == ["b.jsonl", "d.jsonl", "0-tie.jsonl", "a.jsonl", "e.jsonl", "c.jsonl",
                                  "later.jsonl"]


def test_a_file_still_open_at_start_waits_for_its_writer_without_blocking_the_inbox(home, tmp_path):
    home.write_config(inbox_stable_seconds=0.3)
    inbox = home.path / "inbox"
    old = time.time() - 3600
    os.utime(write_jsonl(inbox / "first.jsonl", text_records(2, "first")), (old, old))
    with open(inbox / "growing.jsonl", "w") as fh:
        fh.write(json.dumps({"text": "part 1"}) + "\n")
        fh.flush()
        os.utime(inbox / "growing.jsonl", (old - 10, old - 10))   # oldest of all, but still open
        home.launch()
        os.rename(write_jsonl(tmp_path / "later.jsonl", text_records(2, "later")), inbox / "later.jsonl")
        wait_for(lambda: home.files("done") == ["first.jsonl", "later.jsonl"], what="others not blocked")
        time.sleep(0.6)                               # two stable intervals
        assert (inbox / "growing.jsonl").exists(), "taken while its writer still had it open"
        fh.write(json.dumps({"text": "part 2"}) + "\n")
    wait_for(lambda: "growing.jsonl" in home.files("done"), what="taken once closed")
    jobs = {j["name"]: j for j in json.loads(home.ctl("queue", "list", "--json").stdout)}
    assert jobs["growing.jsonl"]["records"] == 2
    assert _queue_order(home) == ["first.jsonl", "later.jsonl", "growing.jsonl"]
