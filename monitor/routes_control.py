"""POST /api/control/{pause,resume,skip,stop}: a control request, as trainer-ctl writes it."""
from __future__ import annotations

import enum
from typing import Any

from fastapi import APIRouter, Depends

from monitor.services import Services, services

router = APIRouter(tags=["control"])


class TrainingCommand(str, enum.Enum):
    pause = "pause"
    resume = "resume"
    skip = "skip"
    stop = "stop"


@router.post("/api/control/{command}",
             summary="pause, resume, skip or stop; waits up to 5 s for the daemon's answer",
             responses={409: {"description": "the daemon refused (e.g. nothing to skip)"},
                        503: {"description": "the daemon is not running"},
                        504: {"description": "the daemon did not answer in time"}})
def post_control(command: TrainingCommand, svc: Services = Depends(services)) -> dict[str, Any]:
    return svc.send_control(command.value)
