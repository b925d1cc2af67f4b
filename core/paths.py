"""The runtime layout under one base dir (repo root by default; TRAINER_HOME overrides)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.states import FOLDER_STATES, JobState

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_under(home: Path, raw: str | os.PathLike[str] | None) -> Path | None:
    """A path as config.json and the journals name it: ``~`` expanded, relative ones under *home*.
    None for an empty value. The one place a configured path (base_model, ...) is resolved."""
    if not raw:
        return None
    p = Path(raw).expanduser()
    return p if p.is_absolute() else Path(home) / p


def default_home() -> Path:
    env = os.environ.get("TRAINER_HOME")
    return Path(env).expanduser().resolve() if env else REPO_ROOT


@dataclass(frozen=True)
class Layout:
    home: Path

    @classmethod
    def from_env(cls, home: Path | str | None = None) -> "Layout":
        return cls(Path(home).expanduser().resolve() if home else default_home())

    @property
    def config(self) -> Path: return self.home / "config.json"
    @property
    def inbox(self) -> Path: return self.home / "inbox"
    @property
    def queue(self) -> Path: return self.home / "queue"
    def state_dir(self, state: JobState) -> Path: return self.queue / state.folder
    @property
    def status_dir(self) -> Path: return self.home / "status"
    @property
    def status_file(self) -> Path: return self.status_dir / "training_status.json"
    @property
    def metrics_file(self) -> Path: return self.status_dir / "metrics.jsonl"
    @property
    def layer_activity_file(self) -> Path: return self.status_dir / "layer_activity.json"
    @property
    def job_specs(self) -> Path: return self.status_dir / "jobs"   # a running attempt's JobSpec
    @property
    def state_db(self) -> Path: return self.status_dir / "state.db"
    @property
    def logs(self) -> Path: return self.home / "logs"
    @property
    def training_log(self) -> Path: return self.logs / "training_output.log"
    @property
    def control(self) -> Path: return self.home / "control"
    @property
    def current_model(self) -> Path: return self.home / "current_model"
    @property
    def checkpoints(self) -> Path: return self.home / "checkpoints"
    def job_checkpoints(self, job_id: int) -> Path: return self.checkpoints / f"job-{job_id}"
    def set_aside_checkpoints(self, job_id: int) -> Path:
        """Where a skipped or failed job's checkpoints wait for a retry (never 'mid-way')."""
        return self.checkpoints / "set-aside" / f"job-{job_id}"
    @property
    def snapshots(self) -> Path: return self.home / "snapshots"
    @property
    def retention(self) -> Path: return self.home / "retention"   # trainer/retention_eval.py
    @property
    def runs(self) -> Path: return self.home / "runs"             # TensorBoard (trainer/tboard.py)
    @property
    def eval_file(self) -> Path: return self.status_dir / "eval.json"   # the forgetting matrix
    @property
    def token_cache(self) -> Path: return self.home / "cache" / "tokens"   # trainer/tokencache.py
    @property
    def consolidated(self) -> Path: return self.home / "consolidated_models"
    @property
    def pid_file(self) -> Path: return self.home / ".daemon.pid"
    @property
    def stop_flag(self) -> Path: return self.home / ".stop"

    def ensure(self) -> None:
        for d in (self.inbox, *(self.state_dir(s) for s in FOLDER_STATES), self.status_dir,
                  self.logs, self.control, self.snapshots, self.consolidated, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)
