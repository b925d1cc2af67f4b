"""Data parallelism over torchrun: this process's rank, and the few collectives a job needs.

The daemon starts the worker through ``torch.distributed.run`` when ``distributed`` asks for more
than one rank (daemon/launcher.py). Every rank holds the 4-bit base on its own device and the same
LoRA weights; each optimizer step's micro-batches are dealt out round-robin (micro-batch i to rank
i mod N), and one all-reduce per step sums the LoRA gradients, the loss and an out-of-memory flag.
The loss of every micro-batch is divided by the trained-token count of the *whole* global step
(known to every rank from the plan), so the summed gradient is the 1-rank step's: an N-rank run is
the 1-rank run with the same ``batch_size x gradient_accumulation`` global batch, and the data
position (a global step) resumes on any number of ranks.

That one flat all-reduce after the last micro-batch is what ``DistributedDataParallel`` does with
``no_sync`` over gradient accumulation, without wrapping the model (DDP would broadcast every 4-bit
base tensor at construction, and its bucket overlap buys little for LoRA's few MB of gradients).

Rank 0 alone talks to the daemon (stdin commands, stdout events) and writes (checkpoints,
current_model/, snapshots, retention sets, probes); it broadcasts the job and, at every step
boundary, its command, so pause/resume/skip/stop take effect on every rank at the same step.
Every collective has ``distributed.timeout_s``; a rank that dies ends the torchrun group.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Sequence

import torch

from core.interface import Command

log = logging.getLogger("trainer.distributed")

TIMEOUT_ENV = "TRAINER_DIST_TIMEOUT_S"      # set by the daemon from distributed.timeout_s
KEEPALIVE_S = 10.0                          # a waiting rank 0 re-broadcasts this often (pause, idle)
_COMMANDS = [None, *Command]                # a command travels as its index here


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) without torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    return env_rank()[0] == 0


class Ranks:
    """This process's place in the group. ``Ranks()`` (world 1) makes every method a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.is_main = rank == 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """Join torchrun's group (NCCL on GPUs, gloo on CPU), or a single process without torchrun."""
        rank, world, local = env_rank()
        ranks = cls(rank, world, local)
        if world > 1 and not torch.distributed.is_initialized():
            timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))
            cuda = torch.cuda.is_available() and os.environ.get("TRAINER_DEVICE", "auto") != "cpu"
            if cuda:
                if local >= torch.cuda.device_count():
                    raise RuntimeError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible, "
                                       "fewer than distributed.nproc_per_node (use \"auto\")")
                torch.cuda.set_device(local)
            torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                                                 device_id=torch.device("cuda", local) if cuda else None)
            log.info("rank %d of %d (local rank %d): %s process group", rank, world, local,
                     "nccl" if cuda else "gloo")
        return ranks

    def __repr__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def share(self, n: int) -> range:
        """The indices of a step's *n* micro-batches this rank runs (i mod world == rank)."""
        return range(self.rank, n, self.world)

    def reduce_step(self, params: Sequence[torch.Tensor], extras: list[torch.Tensor]) -> list[float] | None:
        """Sum every rank's gradients of *params* (in place; a rank with none adds zeros) and the
        0-d tensors *extras* in one all-reduce; returns the summed extras (None with one rank)."""
        if self.world == 1:
            return None
        device = extras[0].device
        flat = [p.grad.reshape(-1).float() if p.grad is not None else
                torch.zeros(p.numel(), device=device, dtype=torch.float32) for p in params]
        buf = torch.cat(flat + [e.reshape(1).float().to(device) for e in extras])
        torch.distributed.all_reduce(buf)
        k = 0
        for p in params:
            n = p.numel()
            part = buf[k:k + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
            k += n
        return buf[k:].tolist()

    def same_params(self, params: Sequence[torch.Tensor]) -> None:
        """Every rank starts from rank 0's LoRA weights (they are made alike; this makes it sure)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    def command(self, cmd: Command | None) -> Command | None:
        """Rank 0's *cmd* on every rank (the others' argument is ignored)."""
        if self.world == 1:
            return cmd
        code = torch.tensor([_COMMANDS.index(cmd) if self.is_main else 0], dtype=torch.int64,
                            device=self._device())
        torch.distributed.broadcast(code, src=0)
        return _COMMANDS[int(code.item())]

    def share_object(self, obj: Any = None) -> Any:
        """Rank 0's *obj* (JSON-like) on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def _device(self) -> torch.device:
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
