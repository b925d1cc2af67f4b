"""Job states and the allowed transitions, in one table (stdlib only).

Each state but ``missing`` is a folder under ``queue/`` (``FOLDER_STATES``); a transition between
them is one ``os.rename``, checked here first. ``missing`` is recorded (state.db only) when a
job's file vanished from its folder behind trainerd's back; nothing leaves it. Like supervisor's
process states and rq's JobStatus: nothing changes a job's state without ``check_transition``.
"""
from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    MISSING = "missing"       # state.db only: the file vanished from its folder (not by trainerd)

    @property
    def folder(self) -> str:
        if self is JobState.MISSING:
            raise ValueError("a missing job has no queue folder")
        return self.value


class Priority(str, enum.Enum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# from-state -> allowed to-states. Entering the queue (inbox -> pending/failed/done) is `ACCEPT`.
_M = JobState.MISSING
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PROCESSING, JobState.FAILED, _M}),
    JobState.PROCESSING: frozenset({JobState.DONE, JobState.FAILED, JobState.PENDING, _M}),
    JobState.DONE: frozenset({_M}),
    JobState.FAILED: frozenset({JobState.PENDING, _M}),
    JobState.MISSING: frozenset(),
}
FOLDER_STATES: tuple[JobState, ...] = tuple(s for s in JobState if s is not _M)
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
