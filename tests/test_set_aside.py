"""Skipped and failed jobs leave nothing that blocks (issue 9, item 7), with the real trainer.

A job skipped part-way keeps its checkpoints for a retry, set aside under
checkpoints/set-aside/job-N: they never block a consolidation or a preset switch. A retry puts
them back; the trainer resumes from them only if they still extend current_model/ (here the
base changed, so the job restarts on the new base and says so).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon_helpers import alive, wait_for, write_jsonl
from core.statedb import StateDB
from daemon.generator import generate_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from trainer.tiny_base import build_tiny_base
    return build_tiny_base(tmp_path_factory.mktemp("bases") / "tiny")


def test_skipped_job_never_blocks_consolidation_or_a_preset_switch(home, base_dir):
    home.write_config(trainer="qlora", base_model=str(base_dir), max_length=64, batch_size=2,
                      gradient_accumulation=1, learning_rate=2e-3, lr_scheduler="constant",
                      checkpoint_every_steps=2, worker_timeout_s=120,
                      presets={"gentle": {"learning_rate": 1e-3}})
    write_jsonl(home.path / "inbox/a.jsonl", generate_records(200, seed=1))
    home.launch()
    wait_for(lambda: list((home.path / "checkpoints").glob("job-1/step-*")), timeout=240, what="a checkpoint")
    assert home.ctl("skip").returncode == 0
    wait_for(lambda: home.files("failed") == ["a.jsonl"], timeout=120, what="a.jsonl skipped")
    # the checkpoints are set aside just after the file's rename into failed/
    wait_for(lambda: not (home.path / "checkpoints/job-1").exists(), timeout=30,
             what="job-1's checkpoints set aside")
    kept = sorted(p.name for p in (home.path / "checkpoints/set-aside/job-1").glob("step-*"))
    assert kept, "the skipped job's checkpoints are kept for a retry"

    # a preset switch while idle is not refused by the skipped job
    r = home.ctl("preset", "gentle")
    assert r.returncode == 0, r.stdout + r.stderr
    assert home.ctl("preset", "none").returncode == 0

    write_jsonl(home.path / "inbox/b.jsonl", generate_records(12, seed=2))
    wait_for(lambda: home.files("done") == ["b.jsonl"], timeout=240, what="b.jsonl trained")
    pid = home.pid()
    r = home.ctl("consolidate", "--description", "after a skip")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped mid-way" not in r.stdout + r.stderr and "consolidated into" in r.stdout
    assert not alive(pid), "the daemon was stopped for the consolidation"
    new_pid = wait_for(lambda: home.pid() != pid and home.pid(), timeout=30, what="the daemon started again")
    home.started.append(new_pid)
    assert sorted(p.name for p in (home.path / "checkpoints/set-aside/job-1").glob("step-*")) == kept

    # the retry: checkpoints restored, but they are on the old base: the job restarts on the new one
    r = home.ctl("queue", "retry", "a.jsonl")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: home.files("done") == ["a.jsonl", "b.jsonl"], timeout=300, what="a.jsonl retried")
    assert not (home.path / "checkpoints/set-aside/job-1").exists()
    db = StateDB(home.path / "status/state.db", readonly=True)
    try:
        restarted = [e for e in db.events(limit=1000) if e["kind"] == "restarted" and e["job_id"] == 1]
    finally:
        db.close()
    assert len(restarted) == 1 and "another base" in restarted[0]["message"], restarted
    state = json.loads((home.path / "current_model/trainer_state.json").read_text())
    assert [d["name"] for d in state["datasets"]] == ["a.jsonl"]      # a fresh adapter on the new base
    assert state["base_model"] != str(base_dir.resolve())
