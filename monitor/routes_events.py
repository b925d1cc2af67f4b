"""GET /api/stream: Server-Sent Events with every change as it happens.

Each connection polls cheap ``stat()`` keys every POLL_S (0.25 s) in a worker thread and sends an
event only when something changed:

- ``status``   the /api/status payload (status file rewritten, or the daemon came or went)
- ``metrics``  ``{"records": [...], "reset": bool}``: new lines of metrics.jsonl
- ``queue``    the /api/queue payload (state.db written)
- ``events``   ``{"events": [...], "reset": bool}``: new rows of the events table
- ``layers``   the /api/layers payload
- ``eval``     the /api/eval payload (the forgetting matrix; state.db or current_model/ changed)
- ``system``   one GPU + memory sample (every sampler tick); ``system_history`` once at start
- ``logs``     ``{"file": "daemon"|"training", "name", "lines": [...], "reset": bool}``

On connect the client first gets the full picture (``reset: true``), so a reconnect needs no
bookkeeping on the client's side.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from core.artifacts import TRAINER_STATE
from core.lock import daemon_running
from monitor.readers import LogFollower, db_version, log_paths, queue_snapshot, recent_events, stat_key
from monitor.services import Services, services

log = logging.getLogger("monitor.stream")
router = APIRouter(tags=["stream"])

POLL_S = 0.25
KEEPALIVE_S = 10.0
INITIAL_METRICS = 5000
INITIAL_EVENTS = 100
LOG_LINES = 200


@dataclass
class _Cursor:
    status_key: Any = "unset"
    metrics_seq: int = -1
    metrics_gen: int = -1
    db_key: Any = "unset"
    queue_json: str | None = None
    event_id: int = 0
    layers_key: Any = "unset"
    eval_key: Any = "unset"
    eval_json: str | None = None
    system_counter: int = -1
    logs: dict[str, LogFollower] = field(default_factory=lambda: {"daemon": LogFollower(),
                                                                  "training": LogFollower()})


def _changes(svc: Services, cur: _Cursor) -> list[tuple[str, Any]]:
    """Everything that changed since *cur* (mutates it). Runs in a worker thread."""
    out: list[tuple[str, Any]] = []
    layout = svc.layout
    first = cur.status_key == "unset"

    key = (stat_key(layout.status_file), daemon_running(layout))
    if key != cur.status_key:
        cur.status_key = key
        out.append(("status", svc.status()))

    n = svc.metrics.refresh()
    gen = svc.metrics.generation
    if gen != cur.metrics_gen:
        cur.metrics_gen = gen
        recs = svc.metrics.since(-1, INITIAL_METRICS)
        # another request may have refreshed the index since: what was sent is the cursor
        cur.metrics_seq = max(n - 1, recs[-1]["seq"] if recs else -1)
        out.append(("metrics", {"reset": True, "records": recs, "total": n}))
    elif n - 1 > cur.metrics_seq:
        recs = svc.metrics.since(cur.metrics_seq, INITIAL_METRICS)
        cur.metrics_seq = max(n - 1, recs[-1]["seq"] if recs else -1)
        out.append(("metrics", {"reset": False, "records": recs, "total": n}))

    dbk = db_version(layout)
    if dbk != cur.db_key:
        cur.db_key = dbk
        q = queue_snapshot(layout)
        qj = json.dumps(q, sort_keys=True, default=str)
        if qj != cur.queue_json:
            cur.queue_json = qj
            out.append(("queue", q))
        if first:
            ev = recent_events(layout, limit=INITIAL_EVENTS)
            out.append(("events", {"reset": True, **ev}))
        else:
            ev = recent_events(layout, limit=1000, since_id=cur.event_id)
            if ev["events"]:
                out.append(("events", {"reset": False, **ev}))
        if ev["events"]:
            cur.event_id = max(cur.event_id, ev["events"][-1]["id"])

    lk = (stat_key(layout.layer_activity_file), key[1] is not None)
    if lk != cur.layers_key:
        cur.layers_key = lk
        out.append(("layers", svc.layers()))

    out += _eval_change(svc, cur)

    counter, history = svc.sampler.snapshot()
    if counter != cur.system_counter:
        if cur.system_counter < 0:
            out.append(("system_history", {"samples": history}))
        elif history:
            out.append(("system", history[-1]))
        cur.system_counter = counter

    for name, path in log_paths(layout).items():
        got = cur.logs[name].poll(path, LOG_LINES)
        if got is not None:
            lines, reset = got
            out.append(("logs", {"file": name, "name": path.name if path and path.is_file() else None,
                                 "lines": lines, "reset": reset}))
    return out


def _eval_change(svc: Services, cur: _Cursor) -> list[tuple[str, Any]]:
    """The forgetting matrix when what it is made of changed (state.db, the live adapter, the config)."""
    layout = svc.layout
    key = (db_version(layout), stat_key(layout.current_model / TRAINER_STATE), stat_key(layout.config))
    if key == cur.eval_key:
        return []
    cur.eval_key = key
    payload = svc.eval_view.read(config=svc.config())
    text = json.dumps(payload, sort_keys=True, default=str)
    if text == cur.eval_json:
        return []
    cur.eval_json = text
    return [("eval", payload)]


def _sse(event: str, data: Any) -> str:
    payload = json.dumps(data, default=str, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n"


EVENTS = ("status", "metrics", "queue", "events", "layers", "eval", "system", "system_history", "logs")
# Open API 3.1 has no way to describe a stream's items; as schemathesis (and OAS 3.2 `itemSchema`)
# read it, the schema of text/event-stream is that of one event
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "an endless Server-Sent Events stream: first the full picture, then each change",
    "content": {"text/event-stream": {"schema": {
        "type": "object",
        "properties": {"event": {"type": "string", "enum": list(EVENTS)},
                       "data": {"type": "string", "contentMediaType": "application/json",
                                "description": "the event's payload, as JSON"},
                       "retry": {"type": "integer", "description": "reconnect delay in ms"}}}}}}}


@router.get("/api/stream", summary="Server-Sent Events: status, metrics, queue, events, layers, "
                                   "eval, system, logs as they change",
            response_class=StreamingResponse, responses=STREAM_RESPONSES)
async def stream(token: str | None = Query(None, description="the token, for EventSource (no headers)"),
                 svc: Services = Depends(services)) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        cur = _Cursor()
        yield "retry: 2000\n\n"
        last_sent = time.monotonic()
        try:
            while True:
                try:
                    changes = await asyncio.to_thread(_changes, svc, cur)
                except Exception:          # a bad read must not end the stream
                    log.exception("stream poll failed")
                    changes = []
                for event, data in changes:
                    yield _sse(event, data)
                    last_sent = time.monotonic()
                if time.monotonic() - last_sent > KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    last_sent = time.monotonic()
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            raise
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
