"""How a job ends early: the exceptions the recipe (trainer/recipe.py) and its parts raise and
catch, and what counts as out of memory (``OOM_ERRORS``, ``free_memory`` after one)."""
from __future__ import annotations

import torch

from core.interface import JobResult


class JobFailed(Exception):
    """A clear, expected failure: the job ends FAILED with this message."""


class _Finished(Exception):
    """Raised inside setup when the job needs no training (already completed)."""

    def __init__(self, result: JobResult) -> None:
        super().__init__(result.reason)
        self.result = result


class _OOM(Exception):
    """Out of memory inside optimizer.step: its state may be half updated, so the job goes back
    to its last checkpoint (an OOM in forward/backward only redoes that step)."""


class _StepFailed(Exception):
    def __init__(self, result: JobResult) -> None:
        super().__init__(result.reason)
        self.result = result


OOM_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


def free_memory() -> None:
    """Return cached blocks to the GPU after an OOM (call it outside the ``except`` block: the
    traceback holds the failed step's activations until the block ends)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
