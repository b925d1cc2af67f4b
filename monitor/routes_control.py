"""POST /api/control/{pause,resume,skip,stop}: a control request, as trainer-ctl writes it."""
from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Depends

from monitor.api_schema import DAEMON_RESPONSES, ControlReply
from monitor.services import Services, services

router = APIRouter(tags=["control"])

COMMANDS = {
    "pause": "pause at the next step boundary",
    "resume": "resume training",
    "skip": "end the current job into queue/failed/ (reason: skipped)",
    "stop": "stop the daemon gracefully; the current job resumes at next start",
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    **DAEMON_RESPONSES,
    409: {**DAEMON_RESPONSES[409], "description": "the daemon refused (e.g. nothing to skip)"},
    504: {**DAEMON_RESPONSES[504], "description": "the daemon did not answer within 5 s; the request "
                                                  "stays in control/ and is applied when it gets to it"},
}


def _endpoint(command: str) -> Callable[..., dict[str, Any]]:
    def endpoint(svc: Services = Depends(services)) -> dict[str, Any]:
        return svc.send_control(command)
    endpoint.__name__ = f"control_{command}"
    return endpoint


# one route per command: any other name is a plain 404 (the catch-all), never a path
for _cmd, _text in COMMANDS.items():
    router.add_api_route(f"/api/control/{_cmd}", _endpoint(_cmd), methods=["POST"], responses=RESPONSES,
                         response_model=ControlReply,
                         summary=f"{_cmd}: {_text} (waits up to 5 s for the daemon's answer)")
