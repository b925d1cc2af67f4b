"""Pick the Trainer implementation named by config ``trainer``."""
from __future__ import annotations

from core.config import Config
from core.interface import Trainer


def make_trainer(cfg: Config) -> Trainer:
    if cfg.trainer == "standin":
        from daemon.standin import StandInTrainer
        return StandInTrainer(cfg.standin_step_seconds)
    from daemon.subprocess_trainer import SubprocessTrainer
    return SubprocessTrainer(keep_worker=True)      # warm: the base stays loaded between jobs
