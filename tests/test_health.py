"""trainer-ctl check finds planted problems; trainer-ctl logs tails both logs."""
from __future__ import annotations

import json

from daemon_helpers import text_records, write_jsonl


def _check(home):
    r = home.ctl("check", "--json")
    return r.returncode, {f["check"]: f for f in json.loads(r.stdout)}


def test_check_is_clean_on_a_fresh_base_dir(home):
    write_jsonl(home.path / "inbox/a.jsonl", text_records(2))
    assert home.burst().returncode == 0
    rc, f = _check(home)
    assert rc == 0, f
    assert f["queue vs state.db"]["detail"] == "consistent" and f["gpu"]["level"] == "ok"


def test_check_finds_stuck_file_locked_key_edit_and_corrupt_checkpoint(home):
    write_jsonl(home.path / "inbox/a.jsonl", text_records(2))
    home.write_config(max_length=256)
    assert home.burst().returncode == 0
    # planted: a file stuck in processing/ with no daemon running
    (home.path / "queue/done/a.jsonl").rename(home.path / "queue/processing/a.jsonl")
    # planted: a locked key edited by hand
    home.write_config(max_length=999)
    # planted: a checkpoint whose weights no longer match its manifest
    ck = home.path / "checkpoints/job-1/step-2"
    ck.mkdir(parents=True)
    (ck / "adapter.safetensors").write_bytes(b"corrupted")
    (ck / "manifest.json").write_text(json.dumps({"files": {"adapter.safetensors": {"size": 9, "sha256": "0" * 64}}}))
    rc, f = _check(home)
    assert rc == 1
    assert f["stuck files"]["level"] == "problem" and "a.jsonl" in f["stuck files"]["detail"]
    assert f["locked keys"]["level"] == "problem" and "max_length: recorded 256" in f["locked keys"]["detail"]
    assert f["checkpoints"]["level"] == "problem" and "sha256" in f["checkpoints"]["detail"]
    assert f["queue vs state.db"]["level"] == "problem"        # db says done, file is in processing/
    table = home.ctl("check").stdout
    assert "FAIL  stuck files" in table


def test_check_reports_invalid_config(home):
    (home.path / "config.json").write_text('{"batch_size": 0}')
    rc, f = _check(home)
    assert rc == 1 and "batch_size" in f["config"]["detail"]


def test_logs_tails_daemon_and_training_logs(home):
    write_jsonl(home.path / "inbox/a.jsonl", text_records(2))
    home.launch()
    home.ctl("stop")
    (home.path / "logs/training_output.log").write_text("step 1 loss 2.0\n")
    out = home.ctl("logs", "-n", "50").stdout
    assert "[daemon]" in out and "trainerd starting" in out and "[train] step 1 loss 2.0" in out
