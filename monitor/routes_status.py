"""GET /api/status, /api/layers, /api/logs, /api/events, /healthz."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from monitor.readers import log_paths, recent_events, tail_lines
from monitor.services import Services, services

router = APIRouter(tags=["status"])

MAX_LOG_LINES = 2000


@router.get("/api/status", summary="training_status.json plus whether the daemon runs")
def get_status(svc: Services = Depends(services)) -> dict[str, Any]:
    return svc.status()


@router.get("/api/layers", summary="status/layer_activity.json, or a plain reason when absent")
def get_layers(svc: Services = Depends(services)) -> dict[str, Any]:
    return svc.layers()


@router.get("/api/logs", summary="tail of the daemon log and the training output log")
def get_logs(lines: int = Query(200, ge=1, le=MAX_LOG_LINES),
             svc: Services = Depends(services)) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, path in log_paths(svc.layout).items():
        if path is None or not path.is_file():
            where = "logs/daemon_YYYYMMDD.log" if key == "daemon" else "logs/training_output.log"
            out[key] = {"file": None, "lines": [], "reason": f"no {where} yet"}
        else:
            out[key] = {"file": path.name, "lines": tail_lines(path, lines)}
    return out


@router.get("/api/events", summary="recent rows of state.db's events table")
def get_events(limit: int = Query(100, ge=1, le=1000), since_id: int = Query(0, ge=0),
               svc: Services = Depends(services)) -> dict[str, Any]:
    return recent_events(svc.layout, limit=limit, since_id=since_id)


@router.get("/healthz", summary="liveness of the monitor itself", tags=["meta"])
def healthz() -> dict[str, Any]:
    return {"ok": True}
