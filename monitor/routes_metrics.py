"""GET /api/metrics (history from status/metrics.jsonl) and /metrics (Prometheus text format)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse

from monitor.prometheus import CONTENT_TYPE, exposition
from monitor.services import Services, services

router = APIRouter(tags=["metrics"])

MAX_LIMIT = 20000


@router.get("/api/metrics", summary="training history: step, loss, lr, tokens/s, ... (incremental)")
def get_metrics(since: int | None = Query(None, description="only records with step > since"),
                job_id: int | None = Query(None, description="only this job's records"),
                since_seq: int | None = Query(None, ge=-1,
                                              description="cursor: records after this seq (see next_seq)"),
                limit: int = Query(2000, ge=1, le=MAX_LIMIT),
                svc: Services = Depends(services)) -> dict[str, Any]:
    q = svc.metrics.query(since_step=since, job_id=job_id, since_seq=since_seq, limit=limit)
    return {"records": q.records, "count": len(q.records), "total": q.total, "next_seq": q.next_seq,
            "more": q.more, "generation": q.generation,
            **({} if q.total else {"reason": "no training metrics yet: they appear once a job trains"})}


# ---- Prometheus (monitor/prometheus.py: a prometheus-client collector) ---------------------------
@router.get("/metrics", response_class=PlainTextResponse, tags=["meta"],
            summary="Prometheus text exposition (step, loss, tokens/s, queue, GPU)")
def prometheus(svc: Services = Depends(services)) -> PlainTextResponse:
    return PlainTextResponse(exposition(svc), media_type=CONTENT_TYPE)
