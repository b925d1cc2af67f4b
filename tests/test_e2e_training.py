"""The user's day with the real trainer: drop a file, see it trained; kill -9, see it resume."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest

from daemon_helpers import alive, wait_for, write_jsonl
from daemon.generator import generate_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    from trainer.tiny_base import build_tiny_base
    return build_tiny_base(tmp_path_factory.mktemp("bases") / "tiny")


def _config(home, base: Path, **extra) -> None:
    home.write_config(trainer="qlora", base_model=str(base), max_length=128, batch_size=2,
                      gradient_accumulation=1, learning_rate=2e-3, lr_scheduler="constant",
                      checkpoint_every_steps=2, keep_checkpoints=2, layer_activity_every_steps=2,
                      eval_fraction=0.1, worker_timeout_s=120, **extra)


def test_drop_a_file_and_see_it_trained(home, base_dir):
    _config(home, base_dir)
    write_jsonl(home.path / "inbox/arith.jsonl", generate_records(48, seed=3))
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert home.files("done") == ["arith.jsonl"], home.ctl("queue", "list").stdout
    steps = [json.loads(l) for l in (home.path / "status/metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["event"] == "step"]
    assert len(steps) >= 3 and all(math.isfinite(s["loss"]) and s["tokens_per_second"] > 0 for s in steps)
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    layers = json.loads((home.path / "status/layer_activity.json").read_text())
    assert layers["job_id"] == 1 and layers["step"] >= 2
    assert (home.path / "current_model/adapter_model.safetensors").exists()
    (snap,) = (home.path / "snapshots").iterdir()
    meta = json.loads((snap / "snapshot.json").read_text())
    assert meta["dataset_sha256"] == json.loads(home.ctl("queue", "list", "--json").stdout)[0]["sha256"]
    assert (home.path / "logs/training_output.log").stat().st_size > 0
    last = home.status()["last_job"]
    assert last["file"] == "arith.jsonl" and last["outcome"] == "completed" and last["loss"] == steps[-1]["loss"]
    assert f"last job: arith.jsonl completed after {len(steps)} steps" in home.ctl("status").stdout


def test_sigkill_daemon_mid_job_resumes_from_checkpoint(home, base_dir):
    _config(home, base_dir)
    write_jsonl(home.path / "inbox/long.jsonl", generate_records(400, seed=4))
    home.launch()
    wait_for(lambda: list((home.path / "checkpoints").glob("job-1/step-*")), timeout=240, what="a checkpoint")
    daemon_pid = home.pid()
    workers = subprocess.run(["pgrep", "-P", str(daemon_pid)], capture_output=True, text=True).stdout.split()
    assert workers, "the worker runs as a child of the daemon"
    os.kill(daemon_pid, signal.SIGKILL)
    wait_for(lambda: not alive(daemon_pid) and not any(alive(int(w)) for w in workers), timeout=20,
             what="daemon and its worker gone")
    assert home.files("processing") == ["long.jsonl"]
    ckpts = sorted(int(p.name.split("-")[1]) for p in (home.path / "checkpoints/job-1").glob("step-*"))
    home.launch()
    st = wait_for(lambda: (home.status().get("current_step") or 0) >= ckpts[-1] and home.status(),
                  timeout=120, what="resumed")
    assert st["current_file"] == "long.jsonl"
    log = (home.path / "logs/training_output.log").read_text()
    assert f"resumed from {home.path / 'checkpoints/job-1'}/step-{ckpts[-1]} (step {ckpts[-1]}," in log
    home.ctl("stop")
    wait_for(lambda: not alive(home.pid() or 0), timeout=120, what="graceful stop")
    assert home.files("processing") == ["long.jsonl"]


def test_missing_base_pauses_daemon_and_keeps_the_queue(home, base_dir, tmp_path):
    missing = tmp_path / "no-such-base"
    _config(home, missing)
    for n in ("a", "b"):
        write_jsonl(home.path / f"inbox/{n}.jsonl", generate_records(8, seed=ord(n)))
    home.launch()
    st = wait_for(lambda: home.status().get("status") == "paused" and home.status(), timeout=120,
                  what="paused on a missing base")
    assert str(missing) in st["last_error"]["message"] and "trainer-ctl resume" in st["last_error"]["message"]
    assert home.files("failed") == [] and sorted(home.files("pending")) == ["a.jsonl", "b.jsonl"]
    home.ctl("config", "unlock", "base_model")
    _config(home, base_dir)
    assert home.ctl("resume").returncode == 0
    wait_for(lambda: home.files("done") == ["a.jsonl", "b.jsonl"], timeout=240, what="both trained")


def test_consolidate_from_the_cli_refuses_mid_job_then_pauses_and_switches_base(home, base_dir):
    _config(home, base_dir)
    write_jsonl(home.path / "inbox/first.jsonl", generate_records(24, seed=5))
    assert home.burst(timeout=300).returncode == 0
    write_jsonl(home.path / "inbox/second.jsonl", generate_records(400, seed=6))
    home.launch()
    wait_for(lambda: home.status().get("current_file") == "second.jsonl"
             and (home.status().get("current_step") or 0) >= 1, timeout=120, what="second training")
    r = home.ctl("consolidate", "--description", "arithmetic v1")
    assert r.returncode == 1 and "second.jsonl is training" in r.stderr and "--pause" in r.stderr
    r = home.ctl("consolidate", "--description", "arithmetic v1", "--pause")
    assert r.returncode == 0, r.stderr
    assert "consolidated into" in r.stdout and "trainerd started" in r.stdout
    cfg = json.loads((home.path / "config.json").read_text())
    assert cfg["base_model"] != str(base_dir) and Path(home.path / cfg["base_model"]).is_dir()
    lineage = home.ctl("lineage").stdout
    assert "arithmetic v1" in lineage and "first.jsonl" in lineage
    # the interrupted job restarts on the new base with a fresh adapter and completes
    wait_for(lambda: home.files("done") == ["first.jsonl", "second.jsonl"], timeout=400, what="second done")
    state = json.loads((home.path / "current_model/trainer_state.json").read_text())
    assert state["base_model"].endswith(cfg["base_model"])


def test_two_files_one_warm_worker_gone_when_the_daemon_ends(home, base_dir):
    """The daemon keeps one worker with the base loaded across files, and ends it when it stops."""
    _config(home, base_dir)
    inbox = home.path / "inbox"
    for i, name in enumerate(("a.jsonl", "b.jsonl")):
        write_jsonl(inbox / name, generate_records(24, seed=20 + i))
        os.utime(inbox / name, (1_000_000 + i, 1_000_000 + i))
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert home.files("done") == ["a.jsonl", "b.jsonl"]
    log = (home.path / "logs/training_output.log").read_text()
    assert log.count("===== worker:") == 1 and log.count("===== job ") == 2, log[-3000:]
    assert "(worker pid" in log and ", warm)" in log and "base already loaded" in log
    pid = int(log.split("(worker pid ", 1)[1].split(")")[0].split(",")[0])
    assert wait_for(lambda: not alive(pid), timeout=10, what="the worker's exit"), "worker left behind"
