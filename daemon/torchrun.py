"""The worker's command line and environment: ``python -m trainer.worker --serve``, or the same
under torchrun (``python -m torch.distributed.run``) when ``distributed`` asks for more than one rank.

One node (``nnodes`` 1): ``--standalone`` (a free local port). Several: this node is node 0 and
the rendezvous is static at ``rdzv_endpoint`` (``--master-addr/--master-port``), so the global rank
0 (the one that talks to the daemon) is always here; followers (daemon/follower.py) start the same
worker with their own ``--node-rank``. ``--max-restarts 0``: a rank that fails ends the group,
and the daemon resumes the job from its last checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

def visible_gpus() -> int:
    """NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES, else NVML's count); 0 without."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU
        return 0


def nproc(dist: dict[str, Any], device: str = "auto") -> int:
    """Ranks on this node: ``nproc_per_node``, with "auto" every visible GPU (1 on CPU)."""
    n = dist.get("nproc_per_node", 1)
    if n == "auto":
        return max(1, visible_gpus()) if device != "cpu" else 1
    return int(n)


def world_size(config: dict[str, Any]) -> int:
    dist = config.get("distributed") or {}
    return nproc(dist, str(config.get("device", "auto"))) * int(dist.get("nnodes", 1))


def worker_command(python: str, config: dict[str, Any], module: str = "trainer.worker",
                   node_rank: int = 0) -> list[str]:
    """The argv that starts this node's worker (all its ranks) for a job with *config*."""
    serve = ["-m", module, "--serve"]
    if world_size(config) <= 1:
        return [python, *serve]
    dist = config.get("distributed") or {}
    nnodes = int(dist.get("nnodes", 1))
    cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc-per-node", str(nproc(dist, str(config.get("device", "auto")))),
           "--max-restarts", "0", "--monitor-interval", "0.5"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        host, _, port = str(dist["rdzv_endpoint"]).rpartition(":")
        cmd += ["--node-rank", str(node_rank), "--master-addr", host.strip("[]"), "--master-port", port]
    return cmd + serve


def worker_env(config: dict[str, Any]) -> dict[str, str]:
    """What every rank reads before it knows the job: the collectives' timeout and the device."""
    dist = config.get("distributed") or {}
    return {"TRAINER_DIST_TIMEOUT_S": str(float(dist.get("timeout_s", 1800.0))),
            "TRAINER_DEVICE": str(config.get("device", "auto"))}


def worker_process_env() -> dict[str, str]:
    """The environment a worker (and each torchrun rank) starts with."""
    env = dict(os.environ)
    # the worker tokenizes in batches on all cores (trainer/tokencache.py; the result does not
    # depend on it) and never forks, so the tokenizers' thread pool is safe there
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true",
                "PYTHONUNBUFFERED": "1"})
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    return env
