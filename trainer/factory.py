"""Pick the Trainer implementation named by config ``trainer``."""
from __future__ import annotations

from daemon.config import Config
from trainer.interface import Trainer


def make_trainer(cfg: Config) -> Trainer:
    if cfg.trainer == "standin":
        from trainer.standin import StandInTrainer
        return StandInTrainer(cfg.standin_step_seconds)
    from trainer.subprocess_trainer import SubprocessTrainer
    return SubprocessTrainer(keep_worker=True)      # warm: the base stays loaded between jobs
