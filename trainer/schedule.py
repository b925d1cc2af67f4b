"""The learning-rate schedules: the job's (per file over the fraction of the job done,
trainer/plan.py, or continuous across files), and the step-based one of transformers
(bench/bench_throughput.py).

Continuous (``constant_with_warmup``, ``wsd``): the position is the adapter's optimizer step count
across files, ``offset`` (carried in current_model/, trainer/continuity.py) plus the job's step.
Warmup runs while that count is below ``warmup_steps`` (the first job; again once a consolidation
or a fresh AdamW starts the count over); then the factor stays 1. ``wsd`` decays only when asked:
with ``decay`` > 0 the factor falls linearly to 0 over the last ``decay`` share of the job
(by the fraction of the job done, so it needs no step count before the file is tokenized).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from core.config import CONTINUOUS_SCHEDULES


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> Any:
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, max(total, 1))
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, max(total, 1))
    return get_constant_schedule_with_warmup(optimizer, warmup)


def continuous_factor(kind: str, warmup: int, offset: int, decay: float,
                      fraction: Callable[[int], float]) -> Callable[[int], float]:
    """The LambdaLR factor at the job's step *step* of a continuous schedule (module docstring)."""
    def factor(step: int) -> float:
        g = offset + step
        if g < warmup:
            return g / max(1, warmup)
        if kind == "wsd" and decay > 0:
            start = 1.0 - decay
            f = fraction(step)
            if f >= start:
                return max(0.0, 1.0 - (f - start) / decay)
        return 1.0
    return factor


def fraction_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int,
                       fraction: Callable[[int], float], offset: int = 0, decay: float = 0.0) -> Any:
    """The job's LR schedule: a continuous one from the adapter's step *offset*, or a per-file one
    over the fraction of the job done (trainer/plan.py): neither needs the total step count
    before the file is tokenized."""
    from trainer.plan import lr_factor

    if kind in CONTINUOUS_SCHEDULES:
        factor = continuous_factor(kind, warmup, offset, decay, fraction)
    else:
        factor = lr_factor(kind, warmup, fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
