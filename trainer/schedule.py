"""The learning-rate schedules: the job's, over the fraction of the job done (trainer/plan.py),
and the step-based one of transformers (bench/bench_throughput.py)."""
from __future__ import annotations

from typing import Any, Callable

import torch


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> Any:
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, max(total, 1))
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, max(total, 1))
    return get_constant_schedule_with_warmup(optimizer, warmup)


def fraction_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int,
                       fraction: Callable[[int], float]) -> Any:
    """The LR schedule over the fraction of the job done (trainer/plan.py): it needs no
    total step count before the file is tokenized."""
    from trainer.plan import lr_factor

    factor = lr_factor(kind, warmup, fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
