"""Beyond one GPU, on CPU: the daemon trains one job on N torchrun ranks (gloo) and N "nodes"
(torchrun with --nnodes 2 on localhost), and the result is the 1-rank run's.

Every test drops the same file with the same global batch (batch_size 1 x gradient_accumulation
3: 3 micro-batches per step, dealt 2 + 1 to two ranks, so the split is uneven) and compares the
published adapter with the one a single rank makes (``reference``).
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from core.config import Config, ConfigError, load_config
from core.paths import Layout
from daemon.generator import generate_records
from daemon.torchrun import worker_command, world_size
from daemon_helpers import REPO, Home, alive, env_for, wait_for, write_jsonl

RECORDS = 1000          # about 110 steps of 3 micro-batches (packed rows of 128 tokens)
TOL = 1e-5


def settings(base: Path, **extra: Any) -> dict[str, Any]:
    return {**dict(trainer="qlora", base_model=str(base), device="cpu", max_length=128, batch_size=1,
                   gradient_accumulation=3, learning_rate=2e-3, lr_scheduler="constant", eval_fraction=0.05,
                   checkpoint_every_steps=10, keep_checkpoints=2, worker_timeout_s=120, retry_backoff_s=0,
                   probe_retention_examples=0), **extra}


HOMES: list[Home] = []      # their daemons are SIGKILLed after each test (the ranks die with them)


@pytest.fixture(autouse=True)
def no_daemon_left() -> Any:
    yield
    while HOMES:
        HOMES.pop().kill_all()


def make_home(root: Path, base: Path, nproc: int = 1, **extra: Any) -> Home:
    h = Home(root)
    HOMES.append(h)
    Layout(h.path).ensure()
    h.write_config(**settings(base, distributed={"nproc_per_node": nproc, **extra.pop("distributed", {})},
                              **extra))
    return h


def drop(h: Home) -> None:
    write_jsonl(h.path / "inbox/arith.jsonl", generate_records(RECORDS, seed=11))


def adapter(h: Home) -> dict[str, Any]:
    from safetensors.torch import load_file
    return load_file(h.path / "current_model/adapter_model.safetensors")


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    d = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |adapter - 1-rank adapter| = {d:.2e}")      # the figure bench/README.md quotes (-s)
    return d


def ranks_of(h: Home) -> list[psutil.Process]:
    """The worker's rank processes (children of the daemon's torchrun)."""
    daemon = psutil.Process(h.pid() or 0)
    return [p for p in daemon.children(recursive=True)
            if "trainer.worker" in " ".join(p.cmdline()) and "torch.distributed.run" not in " ".join(p.cmdline())]


def rank_env(p: psutil.Process) -> int:
    return int(p.environ()["RANK"])


def training_log(h: Home) -> str:
    return (h.path / "logs/training_output.log").read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.tiny_base import build_tiny_base
    return build_tiny_base(tmp_path_factory.mktemp("dist_base") / "tiny", seed=0)


@pytest.fixture(scope="module")
def reference(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The adapter one rank makes from the file."""
    h = make_home(tmp_path_factory.mktemp("dist_ref") / "home", base, nproc=1)
    drop(h)
    r = h.burst(timeout=600)
    assert r.returncode == 0 and h.files("done") == ["arith.jsonl"], r.stderr[-2000:]
    assert "torch.distributed.run" not in training_log(h)         # one rank: the plain worker
    return adapter(h)


# ---- the settings ------------------------------------------------------------------------------

def test_distributed_settings_are_validated(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"distributed": {"nproc_per_node": 0, "nnodes": 2, "timeout_s": -1}}')
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "distributed.nproc_per_node" in msg and "distributed.timeout_s" in msg, msg
    bad.write_text('{"distributed": {"nnodes": 2}}')
    with pytest.raises(ConfigError, match="needs rdzv_endpoint"):
        load_config(bad)
    bad.write_text('{"distributed": {"nnodes": 2, "rdzv_endpoint": "node0"}}')
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(bad)
    assert Config(distributed={"nproc_per_node": "auto"}).distributed.nproc_per_node == "auto"


def test_the_worker_command(monkeypatch: pytest.MonkeyPatch) -> None:
    one = Config().model_dump()
    assert worker_command("py", one) == ["py", "-m", "trainer.worker", "--serve"]
    two = Config(distributed={"nproc_per_node": 2}).model_dump()
    cmd = worker_command("py", two)
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--max-restarts") + 1] == "0"
    nodes = Config(distributed={"nnodes": 3, "rdzv_endpoint": "10.0.0.5:29400"}).model_dump()
    cmd = worker_command("py", nodes, node_rank=2)
    assert [cmd[cmd.index(k) + 1] for k in ("--nnodes", "--node-rank", "--master-addr", "--master-port")] \
        == ["3", "2", "10.0.0.5", "29400"]
    auto = Config(distributed={"nproc_per_node": "auto"}).model_dump()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,3")
    assert world_size(auto) == 3
    assert world_size({**auto, "device": "cpu"}) == 1        # "auto" on CPU: one rank
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert world_size(auto) == 1 and worker_command("py", auto)[1:] == ["-m", "trainer.worker", "--serve"]


# ---- the user's day on N ranks -------------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_train_what_one_rank_trains(base: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    h = make_home(tmp_path / "home", base, nproc=2)
    drop(h)
    r = h.burst(timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert h.files("done") == ["arith.jsonl"], h.ctl("queue", "list").stdout
    log = training_log(h)
    assert "torch.distributed.run" in log and "[rank 1] trainer.distributed: rank 1 of 2" in log
    assert max_diff(adapter(h), reference) <= TOL
    # rank 0 alone wrote: one snapshot, one step event per step, one adapter
    assert len(list((h.path / "snapshots").iterdir())) == 1
    steps = [int(s) for s in re.findall(r'"event": "step", "step": (\d+)',
                                         (h.path / "status/metrics.jsonl").read_text())]
    (row,) = json.loads(h.ctl("queue", "list", "--json").stdout)
    assert steps == list(range(1, row["steps"] + 1)) and row["steps"] > 50, steps[-5:]


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_attempt_and_the_job_resumes(base: Path, reference: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    h = make_home(tmp_path / "home", base, nproc=2)
    h.launch()
    drop(h)
    wait_for(lambda: list((h.path / "checkpoints").glob("job-1/step-*")), timeout=180, what="a checkpoint")
    group = ranks_of(h)
    assert sorted(rank_env(p) for p in group) == [0, 1]
    launcher = group[0].parent()
    (victim,) = [p for p in group if rank_env(p) == 1]
    victim.send_signal(signal.SIGKILL)
    # the attempt ends: torchrun and the other rank are gone too, nothing hangs in a collective
    wait_for(lambda: not any(alive(p.pid) for p in group + [launcher]), timeout=60, what="the group gone")
    wait_for(lambda: h.files("done") == ["arith.jsonl"], timeout=300, what="the job resumed and finished")
    log = training_log(h)
    assert re.search(r"resumed from \S+/checkpoints/job-1/step-\d+ \(step \d+,", log), log[-3000:]
    (row,) = json.loads(h.ctl("queue", "list", "--json").stdout)
    assert row["attempts"] == 2 and row["crashes"] == 0, row      # the new checkpoint cleared the crash
    assert max_diff(adapter(h), reference) <= TOL
    h.ctl("stop")
    wait_for(lambda: not alive(h.pid() or 0), timeout=60, what="daemon stopped")


@pytest.mark.slow
def test_pause_stops_every_rank_at_the_same_step(base: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    h = make_home(tmp_path / "home", base, nproc=2)
    h.launch()
    drop(h)
    wait_for(lambda: (h.status().get("current_step") or 0) >= 3, timeout=180, what="training")
    assert h.ctl("pause").returncode == 0
    rank0 = r"\[rank 0\] trainer\.recipe: paused at step (\d+)"
    rank1 = r"\[rank 1\] trainer\.recipe: rank 1 of 2: paused at step (\d+)"
    wait_for(lambda: h.status().get("paused") and re.search(rank0, training_log(h))
             and re.search(rank1, training_log(h)), timeout=60, what="both ranks paused")
    log = training_log(h)
    at0, at1 = re.findall(rank0, log), re.findall(rank1, log)
    assert at0 == at1 and len(at0) == 1, (at0, at1)
    step = int(at0[0])
    assert (h.path / f"checkpoints/job-1/step-{step}").is_dir()
    time.sleep(12)              # longer than the keep-alive: the paused group waits, nothing times out
    assert h.status().get("current_step") == step and all(p.is_running() for p in ranks_of(h))
    assert f"step {step}/" in (shown := h.ctl("status").stdout) and "on 2 ranks" in shown, shown
    assert h.ctl("resume").returncode == 0
    wait_for(lambda: h.files("done") == ["arith.jsonl"], timeout=300, what="finished")
    assert len(re.findall(r"\[rank 1\] trainer\.recipe: rank 1 of 2: resumed at step", training_log(h))) == 1
    assert max_diff(adapter(h), reference) <= TOL
    h.ctl("stop")


@pytest.mark.slow
def test_a_checkpoint_of_two_ranks_resumes_on_one(base: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    h = make_home(tmp_path / "home", base, nproc=2)
    h.launch()
    drop(h)
    wait_for(lambda: (h.status().get("current_step") or 0) >= 12, timeout=180, what="training")
    assert h.ctl("stop").returncode == 0
    wait_for(lambda: not alive(h.pid() or 0), timeout=120, what="stopped")
    stopped = max(int(p.name.split("-")[1]) for p in (h.path / "checkpoints/job-1").glob("step-*"))
    assert stopped >= 12 and not h.files("done")
    h.write_config(**settings(base, distributed={"nproc_per_node": 1}))
    r = h.burst(timeout=600)
    assert r.returncode == 0 and h.files("done") == ["arith.jsonl"], r.stderr[-2000:]
    assert f"checkpoints/job-1/step-{stopped} (step {stopped}," in training_log(h)
    assert max_diff(adapter(h), reference) <= TOL


@pytest.mark.slow
def test_two_nodes_on_localhost(base: Path, reference: dict[str, Any], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The main node's daemon and a follower (``trainerd --follow``), each one rank, on one host."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # two "nodes" share this host's cores
    port = free_port()
    h = make_home(tmp_path / "home", base, nproc=1,
                  distributed={"nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{port}"})
    follower = subprocess.Popen([sys.executable, "-m", "daemon", "--home", str(h.path), "--follow",
                                 f"127.0.0.1:{port}", "--node-rank", "1"], cwd=REPO, env=env_for(h.path),
                                stderr=subprocess.PIPE, text=True)
    try:
        drop(h)
        r = h.burst(timeout=600)
        assert r.returncode == 0 and h.files("done") == ["arith.jsonl"], r.stderr[-2000:]
        assert max_diff(adapter(h), reference) <= TOL
        node1 = (h.path / "logs/follower-node-1.log").read_text()
        assert "[rank 1] trainer.worker: rank 1 of 2: job 1 done (completed)" in node1
        assert "--nnodes 2 --nproc-per-node 1" in training_log(h) and "--node-rank 0" in training_log(h)
    finally:
        follower.send_signal(signal.SIGTERM)
        _out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0 and "stopped after 1 group(s)" in err, err[-2000:]


def test_a_follower_refuses_a_single_node_config(home: Home) -> None:
    r = subprocess.run([sys.executable, "-m", "daemon", "--home", str(home.path), "--follow", "127.0.0.1:29500"],
                       cwd=REPO, env=env_for(home.path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs nnodes >= 2" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_sigkilled_daemon_leaves_no_rank(base: Path, tmp_path: Path) -> None:
    """The daemon dies with SIGKILL: torchrun dies with it (PR_SET_PDEATHSIG), every rank with
    torchrun (each set its own); the next start resumes the job."""
    h = make_home(tmp_path / "home", base, nproc=2)
    h.launch()
    drop(h)
    wait_for(lambda: list((h.path / "checkpoints").glob("job-1/step-*")), timeout=180, what="a checkpoint")
    group = ranks_of(h)
    group.append(group[0].parent())
    psutil.Process(h.pid() or 0).send_signal(signal.SIGKILL)
    wait_for(lambda: not any(alive(p.pid) for p in group), timeout=30, what="no rank left")
    h.launch()
    wait_for(lambda: h.files("done") == ["arith.jsonl"], timeout=300, what="resumed and finished")
    h.ctl("stop")


@pytest.mark.slow
def test_a_hung_rank_ends_the_attempt_and_the_job_resumes(base: Path, reference: dict[str, Any],
                                                           tmp_path: Path) -> None:
    """Rank 1 stops answering (SIGSTOP): rank 0 waits in the all-reduce, no step comes, and after
    worker_timeout_s the daemon kills the whole group (a stopped process too); the job resumes."""
    h = make_home(tmp_path / "home", base, nproc=2, worker_timeout_s=20)
    h.launch()
    drop(h)
    wait_for(lambda: list((h.path / "checkpoints").glob("job-1/step-*")), timeout=180, what="a checkpoint")
    group = ranks_of(h)
    (victim,) = [p for p in group if rank_env(p) == 1]
    victim.send_signal(signal.SIGSTOP)
    wait_for(lambda: not any(alive(p.pid) for p in group), timeout=90, what="the hung group killed")
    assert "worker hung: no progress for 20 s" in h.log_text()
    wait_for(lambda: h.files("done") == ["arith.jsonl"], timeout=300, what="the job resumed and finished")
    assert max_diff(adapter(h), reference) <= TOL
    h.ctl("stop")
