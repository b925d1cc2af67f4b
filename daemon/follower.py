"""``trainerd --follow HOST:PORT --node-rank K``: a follower node of a multi-node run.

The main node runs the daemon; its worker is torchrun's node 0 (global rank 0 talks to the daemon,
daemon/torchrun.py). Each other node runs this: it starts this node's share of the ranks
(``distributed.nproc_per_node``) as node K of ``distributed.nnodes``, meeting the main node at
HOST:PORT, and starts them again each time a group ends (one group per job), until SIGTERM/SIGINT.
The ranks get each job from rank 0, so the base model, the datasets and the home folder must be at
the same paths here (a shared filesystem). Their log: ``logs/follower-node-K.log``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

from pydantic import ValidationError

from core.config import ConfigError, DistributedConfig, config_to_dict, load_config
from core.paths import Layout
from core.pdeathsig import set_pdeathsig
from daemon.torchrun import REPO_ROOT, worker_command, worker_env, worker_process_env

log = logging.getLogger("trainerd.follower")

RESTART_PAUSE_S = 1.0


def follow(layout: Layout, endpoint: str, node_rank: int, python: str = sys.executable) -> int:
    """Run this node's ranks, group after group (see the module doc). Returns the exit code."""
    try:
        config = config_to_dict(load_config(layout.config))
    except ConfigError as exc:
        print(f"trainerd --follow: {exc}", file=sys.stderr)
        return 2
    dist = dict(config.get("distributed") or {})
    nnodes = int(dist.get("nnodes", 1))
    if nnodes < 2 or not 1 <= node_rank < nnodes:
        print(f"trainerd --follow: distributed.nnodes is {nnodes} in {layout.config}: a follower needs "
              f"nnodes >= 2 and --node-rank between 1 and nnodes-1 (got {node_rank})", file=sys.stderr)
        return 2
    try:
        config["distributed"] = DistributedConfig(**{**dist, "rdzv_endpoint": endpoint}).model_dump()
    except ValidationError as exc:
        print(f"trainerd --follow: {endpoint!r}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cmd = worker_command(python, config, node_rank=node_rank)
    log_path = layout.logs / f"follower-node-{node_rank}.log"
    print(f"trainerd --follow {endpoint}: node {node_rank} of {nnodes}; log {log_path}", file=sys.stderr)
    groups = 0
    while not stop.is_set():
        with open(log_path, "ab") as fh:
            fh.write(f"\n===== follower node {node_rank}: {' '.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env={**worker_process_env(), **worker_env(config)},
                                    stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, close_fds=True,
                                    start_new_session=True, preexec_fn=set_pdeathsig)
        while proc.poll() is None and not stop.wait(0.5):
            pass
        if proc.poll() is None:     # told to stop: the ranks go with their group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        groups += 1
        log.info("follower node %d: group %d ended (exit code %s)", node_rank, groups, proc.returncode)
        stop.wait(RESTART_PAUSE_S)
    print(f"trainerd --follow: stopped after {groups} group(s)", file=sys.stderr)
    return 0


def main(home: str | None, endpoint: str, node_rank: int) -> int:
    layout = Layout.from_env(home)
    layout.ensure()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return follow(layout, endpoint, node_rank)
