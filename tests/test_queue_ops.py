"""trainer-ctl queue add|list|remove|retry|prioritize, with and without a running daemon."""
from __future__ import annotations

import json

from daemon_helpers import text_records, wait_for, write_jsonl


def _jobs(home):
    return {j["name"]: j for j in json.loads(home.ctl("queue", "list", "--json").stdout)}


def test_priority_order_and_fifo_inside_a_priority(home, tmp_path):
    # daemon down: trainer-ctl applies the changes itself under the daemon lock
    for name, prio in (("n1", "normal"), ("l1", "low"), ("h1", "high"), ("n2", "normal"), ("h2", "high")):
        src = write_jsonl(tmp_path / f"{name}.jsonl", text_records(1, name))
        r = home.ctl("queue", "add", str(src), "--priority", prio)
        assert r.returncode == 0, r.stderr
        assert src.exists(), "queue add copies; the user's file stays"
    assert home.ctl("queue", "prioritize", "l1.jsonl", "high").returncode == 0
    assert home.burst().returncode == 0
    jobs = _jobs(home)
    order = sorted(jobs, key=lambda n: jobs[n]["started_at"])
    assert order == ["h1.jsonl", "h2.jsonl", "l1.jsonl", "n1.jsonl", "n2.jsonl"]


def test_list_remove_retry_through_running_daemon(home, tmp_path):
    home.write_config(standin_step_seconds=0.05)
    home.launch()
    home.ctl("pause")
    wait_for(lambda: home.status().get("status") == "paused", what="paused")
    src = write_jsonl(tmp_path / "a.jsonl", text_records(2, "a"))
    r = home.ctl("queue", "add", str(src))
    assert r.returncode == 0 and "queued a.jsonl" in r.stdout
    out = home.ctl("queue", "list").stdout
    assert "pending" in out and "a.jsonl" in out
    r = home.ctl("queue", "remove", "a.jsonl")
    assert r.returncode == 0, r.stderr
    assert home.files("failed") == ["a.jsonl"] and home.error("a.jsonl")["reason"] == "removed by user"
    r = home.ctl("queue", "remove", "a.jsonl")
    assert r.returncode == 1 and "only pending jobs" in r.stderr
    r = home.ctl("queue", "retry", "a.jsonl")
    assert r.returncode == 0 and home.files("pending") == ["a.jsonl"]
    home.ctl("resume")
    wait_for(lambda: home.files("done") == ["a.jsonl"], what="a done")


def test_bad_requests_get_clear_errors(home, tmp_path):
    r = home.ctl("queue", "remove", "nope.jsonl")
    assert r.returncode == 1 and "no job named 'nope.jsonl'" in r.stderr
    r = home.ctl("queue", "add", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "no such file" in r.stderr
    r = home.ctl("queue", "add", str(tmp_path))
    assert r.returncode == 2 and "not a regular file" in r.stderr
    r = home.ctl("queue", "prioritize", "x.jsonl", "urgent")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    r = home.ctl("queue", "add", str(bad))
    assert r.returncode == 1 and "invalid JSON on line 1" in r.stderr
    assert home.files("failed") == ["bad.jsonl"]
    r = home.ctl("queue", "retry", "bad.jsonl")
    assert r.returncode == 1 and "still invalid" in r.stderr


def test_queue_add_sanitises_names(home, tmp_path):
    src = write_jsonl(tmp_path / "we ird;$(rm -rf x).jsonl", text_records(1))
    r = home.ctl("queue", "add", str(src))
    assert r.returncode == 0, r.stderr
    (name,) = home.files("pending")
    assert "/" not in name and " " not in name and "$" not in name and name.endswith(".jsonl")


def test_concurrent_queue_adds_without_a_daemon_all_land(home, tmp_path):
    import subprocess
    import sys
    from daemon_helpers import REPO, env_for
    srcs = [write_jsonl(tmp_path / f"c{i}.jsonl", text_records(200, f"c{i}")) for i in range(6)]
    procs = [subprocess.Popen([sys.executable, "-m", "ops.ctl", "queue", "add", str(s)], env=env_for(home.path),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in srcs]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    assert home.files("pending") == sorted(f"c{i}.jsonl" for i in range(6))
    assert [p.name for p in (home.path / "inbox").iterdir()] == []       # no staged copy left behind
