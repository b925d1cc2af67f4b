"""GET /api/metrics (history from status/metrics.jsonl) and /metrics (Prometheus text format)."""
from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse

from core.states import DaemonStatus
from monitor.readers import iter_queue_files
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


# ---- Prometheus ---------------------------------------------------------------------------------
def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: Any) -> str | None:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return repr(float(v)) if isinstance(v, float) else str(v)
    return None


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], Any]]) -> None:
        rows = [(labels, _num(v)) for labels, v in samples]
        rows = [(labels, v) for labels, v in rows if v is not None]
        if not rows:
            return
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, v in rows:
            lab = ",".join(f'{k}="{_esc(x)}"' for k, x in labels.items())
            self.lines.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@router.get("/metrics", response_class=PlainTextResponse, tags=["meta"],
            summary="Prometheus text exposition (step, loss, tokens/s, queue, GPU)")
def prometheus(svc: Services = Depends(services)) -> PlainTextResponse:
    st = svc.status()
    e = _Exposition()
    e.metric("trainer_daemon_up", "gauge", "1 when the daemon runs", [({}, st["daemon_running"])])
    states = [s.value for s in DaemonStatus] + ["daemon not running", "starting"]
    e.metric("trainer_status", "gauge", "current daemon status (1 for the current one)",
             [({"status": s}, s == st.get("status")) for s in states])
    e.metric("trainer_paused", "gauge", "1 when paused", [({}, bool(st.get("paused")))])
    for key, name, help_ in (("current_step", "trainer_step", "current step of the running job"),
                             ("total_steps", "trainer_total_steps", "total steps of the running job"),
                             ("loss", "trainer_loss", "last training loss"),
                             ("eval_loss", "trainer_eval_loss", "last evaluation loss"),
                             ("learning_rate", "trainer_learning_rate", "current learning rate"),
                             ("grad_norm", "trainer_grad_norm", "last gradient norm"),
                             ("tokens_per_second", "trainer_tokens_per_second",
                              "real (non-padding) tokens per second"),
                             ("eta_seconds", "trainer_eta_seconds", "estimated seconds left in the job"),
                             ("peak_memory_bytes", "trainer_peak_memory_bytes", "peak accelerator memory")):
        e.metric(name, "gauge", help_, [({}, st.get(key))])
    counts = st.get("queue") if isinstance(st.get("queue"), dict) else {}
    e.metric("trainer_jobs", "gauge", "jobs in state.db by state",
             [({"state": k}, v) for k, v in sorted(counts.items())])
    e.metric("trainer_queue_files", "gauge", "data files in queue/<state>/",
             [({"state": k}, v) for k, v in iter_queue_files(svc.layout)])
    e.metric("trainer_metrics_records", "counter", "records in status/metrics.jsonl",
             [({}, svc.metrics.refresh())])
    sample = svc.sampler.latest() or {"gpu": svc.gpu.sample()}
    gpu = sample.get("gpu") or {}
    e.metric("trainer_gpu_available", "gauge", "1 when NVML reports a GPU", [({}, bool(gpu.get("available")))])
    for key, name, help_ in (("utilization_percent", "trainer_gpu_utilization_percent", "GPU utilisation"),
                             ("memory_used_bytes", "trainer_gpu_memory_used_bytes", "GPU memory used"),
                             ("memory_total_bytes", "trainer_gpu_memory_total_bytes", "GPU memory total"),
                             ("temperature_c", "trainer_gpu_temperature_celsius", "GPU temperature"),
                             ("power_w", "trainer_gpu_power_watts", "GPU power draw")):
        e.metric(name, "gauge", help_, [({"gpu": str(g.get("index")), "name": g.get("name") or ""}, g.get(key))
                                        for g in gpu.get("gpus") or []])
    mem = sample.get("memory")
    if mem:
        e.metric("trainer_system_memory_used_bytes", "gauge", "system RAM in use",
                 [({}, mem["system"]["used_bytes"])])
        e.metric("trainer_daemon_rss_bytes", "gauge", "daemon resident memory",
                 [({}, (mem.get("daemon") or {}).get("rss_bytes"))])
        e.metric("trainer_worker_rss_bytes", "gauge", "resident memory of the daemon's children",
                 [({}, mem.get("worker_rss_bytes") if mem.get("daemon") else None)])
    return PlainTextResponse(e.text(), media_type="text/plain; version=0.0.4; charset=utf-8")
