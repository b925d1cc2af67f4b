"""The warm worker: one worker process serves job after job with the base loaded, still isolates
crashes, and ends on a base change, after its idle limit and on close. Real subprocesses, real
signals, the tiny real base."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from daemon.generator import generate_records
from core.interface import Command, JobSpec, Outcome
from daemon.subprocess_trainer import SubprocessTrainer
from trainer.train import make_job
from trainer.worker import Serving

from test_worker import ONE_THREAD, ListControl, Recorder, worker_config


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def datasets(tmp_path: Path, n: int = 2) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"d{i}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in generate_records(24, seed=10 + i)))
        out.append(p)
    return out


def jobs_for(files: list[Path], home: Path, cfg: dict[str, Any]) -> list[JobSpec]:
    return [make_job(f, home, cfg, job_id=i + 1) for i, f in enumerate(files)]


def adapter(home: Path) -> dict[str, torch.Tensor]:
    return load_file(str(home / "current_model" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_jobs_one_warm_worker_same_adapter_as_cold_workers(tiny_base: Path, tmp_path: Path) -> None:
    files = datasets(tmp_path)
    cfg = worker_config(tiny_base, lora_dropout=0.0)
    warm = SubprocessTrainer(extra_env=ONE_THREAD, keep_worker=True)
    pids, sinks = [], []
    try:
        for job in jobs_for(files, tmp_path / "warm", cfg):
            sink = Recorder()
            assert warm.run(job, sink, ListControl()).outcome is Outcome.COMPLETED
            pids.append(warm.worker_pid)
            sinks.append(sink)
        assert pids[0] is not None and pids == [pids[0]] * 2, "the second job went to the same worker"
        assert warm.workers_started == 1
        notes = [e.get("message", "") for e in sinks[1].events if e["event"] in ("log", "note")]
        assert any("base already loaded" in m for m in notes), notes
        assert not any("base already loaded" in e.get("message", "") for e in sinks[0].events)
    finally:
        warm.close()
    assert wait_gone(pids[0], 5), "close() ends the warm worker"

    cold = SubprocessTrainer(extra_env=ONE_THREAD)             # a fresh worker per job
    for job in jobs_for(files, tmp_path / "cold", cfg):
        assert cold.run(job, Recorder(), ListControl()).outcome is Outcome.COMPLETED
        assert cold.worker_pid is None
    assert cold.workers_started == 2
    a, b = adapter(tmp_path / "warm"), adapter(tmp_path / "cold")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_a_crash_ends_the_warm_worker_and_the_next_job_gets_a_fresh_one(tiny_base: Path, tmp_path: Path) -> None:
    files = datasets(tmp_path)
    first, second = jobs_for(files, tmp_path / "home", worker_config(tiny_base))
    trainer = SubprocessTrainer(extra_env=ONE_THREAD, keep_worker=True)
    killed: list[int] = []

    def kill_at_step(ev: dict[str, Any]) -> None:
        if ev["event"] == "step" and not killed:
            killed.append(trainer.worker_pid or 0)
            os.kill(killed[0], signal.SIGKILL)
    try:
        result = trainer.run(first, Recorder(kill_at_step), ListControl())
        assert result.outcome is Outcome.FAILED and result.reason == "worker died: killed by SIGKILL"
        assert result.details["crash"] is True and trainer.worker_pid is None
        assert trainer.run(second, Recorder(), ListControl()).outcome is Outcome.COMPLETED
        assert trainer.worker_pid not in (None, killed[0]) and trainer.workers_started == 2
    finally:
        trainer.close()


@pytest.mark.slow
def test_a_base_change_replaces_the_worker_and_an_idle_worker_exits(tiny_base: Path, tmp_path: Path) -> None:
    files = datasets(tmp_path)
    home = tmp_path / "home"
    trainer = SubprocessTrainer(extra_env=ONE_THREAD, keep_worker=True)
    try:
        job1 = make_job(files[0], home, worker_config(tiny_base, worker_idle_exit_s=2), job_id=1)
        assert trainer.run(job1, Recorder(), ListControl()).outcome is Outcome.COMPLETED
        pid1 = trainer.worker_pid
        assert pid1 is not None
        # another attention implementation shapes the loaded base: a fresh worker
        job2 = make_job(files[1], home, worker_config(tiny_base, worker_idle_exit_s=2,
                                                      attn_implementation="eager"), job_id=2)
        assert trainer.run(job2, Recorder(), ListControl()).outcome is Outcome.COMPLETED
        idle_from = time.monotonic()
        pid2 = trainer.worker_pid
        assert pid2 not in (None, pid1) and wait_gone(pid1, 5)
        # no job for worker_idle_exit_s (2 s): the worker exits and frees its memory
        assert wait_gone(pid2, 15), "the idle worker did not exit"
        assert time.monotonic() - idle_from >= 1.9, "it exited before its idle limit"
        assert trainer.worker_pid is None
    finally:
        trainer.close()


@pytest.mark.slow
def test_stop_of_a_paused_warm_job_then_the_next_job_runs(tiny_base: Path, tmp_path: Path) -> None:
    """A stop ends the job, not the worker; the worker's next job is not hit by an old command."""
    files = datasets(tmp_path)
    first, second = jobs_for(files, tmp_path / "home", worker_config(tiny_base))
    trainer = SubprocessTrainer(extra_env=ONE_THREAD, keep_worker=True)
    control = ListControl()

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] == "step" and ev["step"] == 1:
            control.pending.append(Command.PAUSE)
        elif ev["event"] == "paused":
            assert trainer.stop_worker()
    try:
        result = trainer.run(first, Recorder(on_event), control)
        assert result.outcome is Outcome.STOPPED
        pid = trainer.worker_pid
        assert pid is not None, "a stopped job leaves the warm worker alive"
        assert trainer.run(second, Recorder(), ListControl()).outcome is Outcome.COMPLETED
        assert trainer.worker_pid == pid
    finally:
        trainer.close()
    assert wait_gone(pid, 5)


def test_commands_reach_only_the_job_they_name() -> None:
    s = Serving()
    s.command(Command.STOP, 1)                 # no job under way: dropped
    control = s.begin(2)
    assert control.poll() is None
    s.command(Command.STOP, 1)                 # too late for job 1: job 2 is not stopped
    assert control.poll() is None
    s.command(Command.PAUSE, 2)
    assert control.poll() is Command.PAUSE
    s.end()                                    # exit: the job under way stops, the loop ends
    assert control.poll() is Command.STOP and s.jobs.get_nowait() is None
