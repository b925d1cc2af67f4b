"""Job states and the allowed transitions, in one table (stdlib only).

Each state except ``duplicate``/``removed`` is a folder under ``queue/``; a transition is one
``os.rename`` between folders, checked here first. Like supervisor's process states and rq's
JobStatus: nothing moves a job without ``check_transition``.
"""
from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"

    @property
    def folder(self) -> str:
        return self.value


class Priority(str, enum.Enum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# from-state -> allowed to-states. Entering the queue (inbox -> pending/failed) is `ACCEPT`.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PROCESSING, JobState.FAILED}),
    JobState.PROCESSING: frozenset({JobState.DONE, JobState.FAILED, JobState.PENDING}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),
}
ACCEPT: frozenset[JobState] = frozenset({JobState.PENDING, JobState.FAILED, JobState.DONE})


class TransitionError(RuntimeError):
    pass


def check_transition(src: JobState | None, dst: JobState) -> None:
    """Raise TransitionError unless src -> dst is allowed (src None means: arriving from inbox)."""
    allowed = ACCEPT if src is None else TRANSITIONS[src]
    if dst not in allowed:
        origin = "inbox" if src is None else src.value
        raise TransitionError(f"job cannot move from {origin} to {dst.value}")


class DaemonStatus(str, enum.Enum):
    IDLE = "idle"
    TRAINING = "training"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"
