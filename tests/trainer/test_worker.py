"""The worker process and SubprocessTrainer: real subprocesses, real signals, real pipes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from core.config import Config, config_to_dict
from daemon.generator import generate_records
from core.interface import Command, Outcome
from daemon.subprocess_trainer import SubprocessTrainer
from trainer.train import make_job

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def worker_config(base: Path, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(base_model=str(base), max_length=64, batch_size=1, lora_r=4,
                              learning_rate=1e-3, epochs=1, checkpoint_every_steps=1000,
                              layer_activity_every_steps=1000, worker_timeout_s=120)
    kw.update(over)
    return config_to_dict(Config(**kw))


@pytest.fixture
def job(tiny_base: Path, tmp_path: Path):
    data = tmp_path / "w.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_records(80, seed=5)))
    return make_job(data, tmp_path / "home", worker_config(tiny_base), job_id=5)


class Recorder:
    """EventSink that records and can act on events (in the SubprocessTrainer's thread)."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.on_event = on_event

    def emit(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        if self.on_event:
            self.on_event(ev)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]


class ListControl:
    def __init__(self) -> None:
        self.pending: list[Command] = []

    def poll(self) -> Command | None:
        return self.pending.pop(0) if self.pending else None

    def wait(self, timeout: float) -> Command | None:
        return self.poll()


@pytest.mark.slow
def test_worker_stdin_pause_resume_then_eof_stops(job, tmp_path: Path) -> None:
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job.to_json()))
    proc = subprocess.Popen([sys.executable, "-m", "trainer.worker", "--job", str(job_file)], cwd=REPO,
                            env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    events: list[dict[str, Any]] = []
    sent: list[str] = []
    for line in proc.stdout:
        ev = json.loads(line)  # every stdout line is one JSON event: nothing else leaks in
        events.append(ev)
        kind = ev["event"]
        if kind == "step" and not sent:
            proc.stdin.write('{"cmd": "pause"}\n')
            proc.stdin.flush()
            sent.append("pause")
        elif kind == "paused":
            ckpt = Path(events[-2]["path"])  # the pause checkpoint precedes "paused"
            assert events[-2]["event"] == "checkpoint" and events[-2]["reason"] == "pause"
            assert ckpt.name == f"step-{ev['step']}" and (ckpt / "manifest.json").is_file()
            time.sleep(0.5)  # paused: no step events meanwhile
            proc.stdin.write('{"cmd": "resume"}\n')
            proc.stdin.flush()
            sent.append("resume")
        elif kind == "resumed":
            proc.stdin.close()  # EOF = stop
            sent.append("eof")
        elif kind == "result":
            break
    rc = proc.wait(timeout=60)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert rc == 0, stderr[-2000:]
    assert sent == ["pause", "resume", "eof"]
    kinds = [e["event"] for e in events]
    i_paused, i_resumed = kinds.index("paused"), kinds.index("resumed")
    assert "step" not in kinds[i_paused:i_resumed]
    paused_step = events[i_paused]["step"]
    steps_after = [e["step"] for e in events[i_resumed:] if e["event"] == "step"]
    assert steps_after == list(range(paused_step + 1, paused_step + 1 + len(steps_after)))
    result = events[-1]
    assert result["event"] == "result" and result["outcome"] == "stopped"
    stop_ckpt = [e for e in events if e["event"] == "checkpoint" and e["reason"] == "stop"]
    assert stop_ckpt and stop_ckpt[0]["step"] == result["steps"] < events[0].get("total_steps", 10**9)
    assert Path(stop_ckpt[0]["path"]).is_dir()
    assert "step " in stderr  # training log lines go to stderr


@pytest.mark.slow
def test_subprocess_trainer_pause_then_daemon_stop_then_skip(job) -> None:
    trainer = SubprocessTrainer(extra_env=ONE_THREAD)
    control = ListControl()

    def act(ev: dict[str, Any]) -> None:
        if ev["event"] == "step" and ev["step"] == 2:
            control.pending.append(Command.PAUSE)
        elif ev["event"] == "paused":
            assert trainer.stop_worker()  # the daemon got STOP while the worker is paused

    sink = Recorder(act)
    result = trainer.run(job, sink, control)
    assert result.outcome is Outcome.STOPPED, result
    paused = sink.of("paused")
    assert len(paused) == 1 and result.steps == paused[0]["step"] >= 2
    assert [c["reason"] for c in sink.of("checkpoint")] == ["pause", "stop"]
    assert (job.home / "checkpoints" / f"job-{job.job_id}" / f"step-{result.steps}").is_dir()
    assert (job.home / "logs" / "training_output.log").stat().st_size > 0

    # next start: resumes from the stop checkpoint, then a skip ends the job at a step boundary
    control2 = ListControl()
    sink2 = Recorder(lambda ev: control2.pending.append(Command.SKIP) if ev["event"] == "step" else None)
    result2 = SubprocessTrainer(extra_env=ONE_THREAD).run(job, sink2, control2)
    assert result2.outcome is Outcome.SKIPPED and result2.reason == "skipped"
    assert sink2.of("started")[0]["resumed_from_step"] == result.steps
    assert sink2.of("step")[0]["step"] == result.steps + 1
    assert sink2.of("checkpoint")[-1]["reason"] == "skip"
    assert result2.steps == sink2.of("checkpoint")[-1]["step"] > result.steps
    assert not (job.home / "current_model").exists()


@pytest.mark.slow
def test_worker_crash_is_failed_with_crash_detail(job) -> None:
    trainer = SubprocessTrainer(extra_env=ONE_THREAD)
    sink = Recorder(lambda ev: os.kill(trainer.worker_pid, signal.SIGKILL) if ev["event"] == "step" else None)
    result = trainer.run(job, sink, ListControl())
    assert result.outcome is Outcome.FAILED
    assert result.reason == "worker died: killed by SIGKILL"
    assert result.details["crash"] is True and result.details["returncode"] == -signal.SIGKILL
    assert trainer.worker_pid is None


@pytest.mark.slow
def test_hung_worker_is_killed_after_timeout(job) -> None:
    trainer = SubprocessTrainer(worker_timeout_s=2.0, startup_timeout_s=300.0, extra_env=ONE_THREAD)
    pids: list[int] = []

    def freeze(ev: dict[str, Any]) -> None:
        if ev["event"] == "started" and not pids:
            pids.append(trainer.worker_pid)
            os.kill(pids[0], signal.SIGSTOP)  # a real hang: alive, silent

    t0 = time.monotonic()
    result = trainer.run(job, Recorder(freeze), ListControl())
    assert result.outcome is Outcome.FAILED
    assert result.reason == "worker hung: no progress for 2 s"
    assert result.details["crash"] is True and result.details["hung"] is True
    assert time.monotonic() - t0 < 60
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pids[0], 0)


def test_worker_dies_with_its_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a SIGKILLed parent (the daemon) leaves no orphan behind."""
    code = ("import subprocess, sys, time\n"
            "from core.pdeathsig import set_pdeathsig\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=set_pdeathsig)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert parent.stdout
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # dead, waiting for its new parent to reap it
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("child outlived its SIGKILLed parent")
