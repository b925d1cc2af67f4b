"""GET /metrics through prometheus-client: the counters say what state.db and the metrics history
say, they survive a monitor restart, and `promtool check metrics` finds nothing to lint.

The home is a real one: a real tiny QLoRA job trained to the end (data report, metrics history,
lineage in current_model/), a file refused at intake, a job removed by the user, and a job that
diverged (learning rate 1e30: NaN steps, failed after max_nonfinite_steps of them in a row).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.paths import Layout
from core.statedb import StateDB, counter_key
from core.states import JobState
from daemon_helpers import write_jsonl
from monitor_helpers import Monitor, make_home, prometheus_samples, promtool_problems
from daemon.generator import generate_records

QLORA = dict(trainer="qlora", max_length=128, batch_size=2, gradient_accumulation=1, learning_rate=2e-3,
             lr_scheduler="constant", checkpoint_every_steps=4, keep_checkpoints=2,
             layer_activity_every_steps=4, eval_fraction=0.1, worker_timeout_s=120)
COUNTERS = ("trainer_jobs_finished", "trainer_steps", "trainer_tokens_trained", "trainer_nonfinite_steps",
            "trainer_data_records")


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of an exposition, its families' types checked."""
    for fam in text_string_to_metric_families(text):
        if fam.name in COUNTERS:
            assert fam.type == "counter", fam
        else:
            assert fam.type == "gauge" and not fam.name.endswith("_total"), fam
    return prometheus_samples(text)


def by(label: str, series: dict[tuple, float]) -> dict[str, float]:
    return {dict(k)[label]: v for k, v in series.items()}


# ---- what state.db and the history say, read here independently ----------------------------------
def expected(home: Path) -> dict[str, Any]:
    """What the files say happened: the jobs' rows, the step events of the (whole) history, the
    nonfinite events, the data reports."""
    layout = Layout(home)
    conn = sqlite3.connect(f"file:{layout.state_db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        jobs = [dict(r) for r in conn.execute("SELECT * FROM jobs")]
        nonfinite = conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'nonfinite'").fetchone()[0]
    finally:
        conn.close()
    history = [json.loads(line) for line in layout.metrics_file.read_text().splitlines()] \
        if layout.metrics_file.exists() else []
    steps = [r for r in history if r.get("event") == "step"]
    reports = {j["id"]: json.loads(j["data_report"]) for j in jobs if j["data_report"]}
    records: dict[str, int] = {}
    for rep in reports.values():
        for reason, r in rep["reasons"].items():
            records[reason] = records.get(reason, 0) + r["count"]
    return {"jobs": jobs, "steps": len(steps), "history": history,
            "tokens": sum(r.get("trained_tokens") or 0 for r in steps), "reports": reports,
            "records": records, "nonfinite": nonfinite}


def fetch(mon: Monitor) -> str:
    r = httpx.get(mon.base + "/metrics", timeout=15)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return r.text


# ---- a real home ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.tiny_base import build_tiny_base
    tmp = tmp_path_factory.mktemp("prom")
    base = build_tiny_base(tmp / "tiny")
    home = make_home(tmp / "home", base_model=str(base), **QLORA)
    good = generate_records(40, seed=3)
    long_question = {"messages": [{"role": "user", "content": "add these: " + " + ".join(["7"] * 200)},
                                  {"role": "assistant", "content": "1400"}]}
    no_user = {"messages": [{"role": "assistant", "content": "42"}]}
    write_jsonl(home.path / "inbox/good.jsonl", good + [good[0], long_question, no_user])
    (home.path / "inbox/broken.jsonl").write_text("this is not json\n{\n")
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert home.files("done") == ["good.jsonl"] and home.files("failed") == ["broken.jsonl"]
    # a job the user takes out of the queue before it starts (no daemon: trainer-ctl does it itself)
    extra = write_jsonl(tmp / "extra.jsonl", generate_records(8, seed=11))
    assert home.ctl("queue", "add", str(extra)).returncode == 0
    r = home.ctl("queue", "remove", "extra.jsonl")
    assert r.returncode == 0, r.stderr
    # a job that diverges: NaN steps, the job fails after 3 of them in a row
    home.write_config(base_model=str(base), **{**QLORA, "learning_rate": 1e30, "max_nonfinite_steps": 3})
    write_jsonl(home.path / "inbox/diverge.jsonl", generate_records(24, seed=5))
    home.burst(timeout=300)
    assert "diverge.jsonl" in home.files("failed"), home.ctl("queue", "list").stdout
    return home.path


@pytest.fixture(scope="module")
def monitor(trained: Path) -> Iterator[Monitor]:
    mon = Monitor(trained).start()
    try:
        yield mon
    finally:
        mon.stop()


@pytest.mark.slow
def test_counters_say_what_state_db_says(trained: Path, monitor: Monitor) -> None:
    want = expected(trained)
    got = samples(fetch(monitor))
    # good.jsonl trained, broken.jsonl refused at intake, extra.jsonl removed, diverge.jsonl failed
    assert by("outcome", got["trainer_jobs_finished_total"]) == {
        "done": 1, "held": 0, "failed": 1, "skipped": 0, "removed": 1, "rejected": 1, "duplicate": 0, "missing": 0}

    # steps and tokens: every step event of the history (whole here), both jobs that trained
    jobs_with_steps = {r["job_id"] for r in want["history"] if r.get("event") == "step"}
    assert len(jobs_with_steps) == 2
    assert got["trainer_steps_total"][()] == want["steps"] > 0
    done = next(j for j in want["jobs"] if j["state"] == "done")
    assert done["steps"] == max(r["step"] for r in want["history"]
                                if r.get("event") == "step" and r["job_id"] == done["id"])
    assert got["trainer_tokens_trained_total"][()] == want["tokens"] > 0
    # one epoch of the done job: at most its data report's figure (eval_fraction holds some out)
    done_tokens = sum(r.get("trained_tokens") or 0 for r in want["history"]
                      if r.get("event") == "step" and r["job_id"] == done["id"])
    assert 0 < done_tokens <= want["reports"][done["id"]]["trained_tokens"]

    assert got["trainer_nonfinite_steps_total"][()] == want["nonfinite"] == 3
    records = by("reason", got["trainer_data_records_total"])
    assert records == want["records"]
    assert {"duplicate", "truncated", "no_user_turn"} <= set(records), records

    # today's gauges are still there
    assert got["trainer_daemon_up"][()] == 0
    assert by("status", got["trainer_status"])["daemon not running"] == 1
    counts = {s.value: sum(1 for j in want["jobs"] if j["state"] == s.value) for s in JobState}
    assert by("state", got["trainer_jobs"]) == counts
    assert by("state", got["trainer_queue_files"])["done"] == 1
    assert got["trainer_metrics_history_records"][()] == len(want["history"])
    assert "trainer_gpu_available" in got


@pytest.mark.slow
def test_counters_survive_a_monitor_restart(trained: Path, monitor: Monitor) -> None:
    before = samples(fetch(monitor))
    again = Monitor(trained).start()
    try:
        after = samples(fetch(again))
    finally:
        again.stop()
    for name in ("trainer_jobs_finished_total", "trainer_steps_total", "trainer_tokens_trained_total",
                 "trainer_nonfinite_steps_total", "trainer_data_records_total"):
        assert after[name] == before[name], name


@pytest.mark.slow
def test_promtool_finds_nothing_to_lint(monitor: Monitor) -> None:
    problems = promtool_problems(fetch(monitor))
    if problems is None:
        pytest.skip("promtool not installed (Debian: apt-get install -y prometheus); "
                    "the exposition was parsed by prometheus-client only")
    assert problems == ""


# ---- states a real run rarely leaves: built the way the daemon writes them -------------------------
def test_counters_table_old_reports_and_odd_reasons(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    db = StateDB(Layout(home.path).state_db)
    try:
        a = db.insert_job(name="a.jsonl", original_name="a.jsonl", state=JobState.DONE, sha256="a", size=10).id
        db.set_data_report(a, {"records": 3, "tokens": 90, "trained_tokens": 40,
                               "reasons": {'quote" and\nnewline \\': {"count": 2, "lines": [1, 2]}}})
        b = db.insert_job(name="b.jsonl", original_name="b.jsonl", state=JobState.FAILED, sha256="b", size=10).id
        db.set_data_report(b, {"format": "text", "records": 5, "tokens": 50, "trained_tokens": 30,
                               "truncated": 1, "skipped_invalid": 2})          # the older flat shape
        # what the daemon adds (daemon/fsqueue.py at each end, daemon/jobflow.py per step)
        db.add_counts({counter_key("trainer_jobs_finished", outcome="done"): 1,
                       counter_key("trainer_jobs_finished", outcome="skipped"): 1,
                       counter_key("trainer_jobs_finished", outcome="missing"): 1,
                       counter_key("trainer_steps"): 10, counter_key("trainer_tokens_trained"): 70,
                       counter_key("trainer_nonfinite_steps"): 1})
        db.add_counts({counter_key("trainer_steps"): 2})                   # added to, never set
    finally:
        db.close()
    mon = Monitor(home.path).start()
    try:
        text = fetch(mon)
        got = samples(text)
        assert by("outcome", got["trainer_jobs_finished_total"]) == {
            "done": 1, "held": 0, "failed": 0, "skipped": 1, "removed": 0, "rejected": 0, "duplicate": 0, "missing": 1}
        assert got["trainer_steps_total"][()] == 12
        assert got["trainer_tokens_trained_total"][()] == 70
        assert got["trainer_nonfinite_steps_total"][()] == 1
        assert by("reason", got["trainer_data_records_total"]) == {
            'quote" and\nnewline \\': 2, "truncated": 1, "skipped_invalid": 2}
        problems = promtool_problems(text)
        assert problems in (None, ""), problems
    finally:
        mon.stop()


def test_no_state_db_yet(tmp_path: Path) -> None:
    mon = Monitor(make_home(tmp_path / "home").path).start()
    try:
        got = samples(fetch(mon))
        assert set(by("outcome", got["trainer_jobs_finished_total"]).values()) == {0}
        assert got["trainer_steps_total"][()] == got["trainer_tokens_trained_total"][()] == 0
        assert "trainer_data_records_total" not in got and "trainer_jobs" not in got
        assert got["trainer_daemon_up"][()] == 0
        head = httpx.head(mon.base + "/metrics", timeout=15)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-type"].startswith("text/plain; version=")
    finally:
        mon.stop()
