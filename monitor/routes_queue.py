"""The queue: list, upload, retry, reprioritise, remove.

Job names in URLs are looked up in state.db and never used as paths: a name that is not exactly a
job's queue name is 404, whatever it decodes to. Uploads are staged like ``trainer-ctl queue add``
does: a hidden ``inbox/.NAME.<hex>.part`` (ignored by the inbox watcher), fsynced, then a
``queue_add`` control request; with the daemon down the staged file is renamed to a unique
``inbox/NAME`` so the daemon picks it up at its next start.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile

from core.atomic import fsync_dir
from daemon import queueops
from daemon.fsqueue import ERROR_SUFFIX
from daemon.intakefile import safe_name
from core.states import JobState, Priority
from monitor.api_schema import (BAD_JSON, NOT_FOUND, QUEUE_OP_RESPONSES, ControlReply, UploadQueued,
                                UploadSaved, error, json_content, ref)
from monitor.readers import find_job, queue_snapshot
from monitor.services import QUEUE_ADD_REPLY_TIMEOUT_S, Services, services

log = logging.getLogger("monitor.queue")
router = APIRouter(tags=["queue"])

RAW_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonlines",
                       "application/json", "application/octet-stream"})
DEFAULT_UPLOAD_NAME = "upload.jsonl"       # a file sent without a name (no file name, no ?name=)
FORM_FIELDS = ("file", "priority", "force")  # a multipart upload's fields (no others)


def _conflict(what: str) -> dict[int | str, dict[str, Any]]:
    return {409: error(f"{what}, or the daemon refused the request (the reason is in `detail`)")}


def _job_change(what: str, *extra: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """The answers of a route that changes one job (daemon/queueops.py: through the daemon when
    it runs, else applied by the monitor under the daemon lock)."""
    out: dict[int | str, dict[str, Any]] = {**NOT_FOUND, **QUEUE_OP_RESPONSES, **_conflict(what)}
    for more in extra:
        out.update(more)
    return out


class PriorityBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: Priority


class RetryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = False


@router.get("/api/queue", summary="every job from state.db, grouped by state")
def get_queue(limit: int = Query(1000, ge=1, le=100000, description="jobs listed per state"),
              svc: Services = Depends(services)) -> dict[str, Any]:
    return queue_snapshot(svc.layout, limit_per_state=limit)


def _job_or_404(svc: Services, name: str) -> dict[str, Any]:
    job = find_job(svc.layout, name)
    if job is None:
        raise HTTPException(404, "no such job in the queue")
    return job


@router.get("/api/queue/{name}",
            summary="one job: its row, its data report (`data_report`) and, for a file rejected at "
                    "intake, its validation report (`validation`: bad lines per kind)",
            responses=NOT_FOUND)
def get_job(name: str, svc: Services = Depends(services)) -> dict[str, Any]:
    job = _job_or_404(svc, name)
    validation = None
    if job["state"] == JobState.FAILED.value:
        # the name was looked up in state.db: it is a queue name, never a path from the URL
        try:
            err = json.loads((svc.layout.state_dir(JobState.FAILED) / (job["name"] + ERROR_SUFFIX))
                             .read_text(encoding="utf-8"))
            validation = err.get("validation") if isinstance(err, dict) else None
        except (OSError, ValueError):
            validation = None
    return {**job, "validation": validation if isinstance(validation, dict) else None}


@router.post("/api/queue/{name}/retry", summary="move a failed job back to pending",
             response_model=ControlReply, responses=_job_change("the job is not failed", BAD_JSON))
def retry(name: str, body: RetryBody | None = Body(None),
          svc: Services = Depends(services)) -> dict[str, Any]:
    job = _job_or_404(svc, name)
    if job["state"] != JobState.FAILED.value:
        raise HTTPException(409, f"'{job['name']}' is {job['state']}; only failed jobs can be retried")
    return svc.queue_op("queue_retry", name=job["name"], force=bool(body and body.force))


@router.post("/api/queue/{name}/priority", summary="set a pending job's priority (high|normal|low)",
             response_model=ControlReply, responses=_job_change("the job is not pending", BAD_JSON))
def prioritize(name: str, body: PriorityBody, svc: Services = Depends(services)) -> dict[str, Any]:
    job = _job_or_404(svc, name)
    if job["state"] != JobState.PENDING.value:
        raise HTTPException(409, f"'{job['name']}' is {job['state']}; only pending jobs have a priority")
    return svc.queue_op("queue_prioritize", name=job["name"], level=body.level.value)


@router.delete("/api/queue/{name}", summary="take a pending job out of the queue (kept in failed/)",
               response_model=ControlReply, responses=_job_change("the job is not pending"))
def remove(name: str, svc: Services = Depends(services)) -> dict[str, Any]:
    job = _job_or_404(svc, name)
    if job["state"] != JobState.PENDING.value:
        raise HTTPException(409, f"'{job['name']}' is {job['state']}; only pending jobs can be removed")
    return svc.queue_op("queue_remove", name=job["name"])


# ---- upload -------------------------------------------------------------------------------------
def _stage_path(inbox: Path, name: str) -> Path:
    return inbox / f".{name}.{uuid.uuid4().hex[:8]}.part"


def _open_staged(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _finish_staged(fd: int, inbox: Path) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(inbox)


def _publish_to_inbox(staged: Path, name: str) -> str:
    """Daemon down: give the staged file its own name in inbox/ (never replacing another file)."""
    stem = name[: -len(".jsonl")]
    n = 1
    while True:
        target = staged.parent / (name if n == 1 else f"{stem}.{n}.jsonl")
        try:
            os.link(staged, target)        # fails if target exists: no clobbering, no race
        except FileExistsError:
            n += 1
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                raise
            if target.exists():
                n += 1
                continue
            os.rename(staged, target)
            fsync_dir(staged.parent)
            return target.name
        staged.unlink()
        fsync_dir(staged.parent)
        return target.name


def _hand_over(svc: Services, staged: Path, name: str, priority: Priority, force: bool) -> JSONResponse:
    """Queue the staged file the way trainer-ctl does (daemon/queueops.py): through the daemon
    when it runs, else here under the daemon lock."""
    reply = queueops.submit(svc.layout, "queue_add", {"staged": staged.name, "name": name,
                                                      "priority": priority.value, "force": force},
                            source="monitor", timeout=QUEUE_ADD_REPLY_TIMEOUT_S)
    if reply.how == "timeout":                # the daemon takes the staged file when it gets to it
        return JSONResponse({"ok": True, "queued": False, "name": name, "message": reply.message},
                            status_code=202)
    if reply.how == "busy":                   # the lock stayed held: the file waits in inbox/
        final = _publish_to_inbox(staged, name)
        return JSONResponse({"ok": True, "queued": False, "name": final,
                             "message": f"{reply.message}: saved as inbox/{final}, queued by the next "
                                        "daemon start"}, status_code=202)
    if not reply.ok:
        # a full disk: the file waits in inbox/ for space; refused: it is in failed/ with the reason
        return JSONResponse({"ok": False, "queued": False, "name": name, "detail": reply.message,
                             "message": reply.message},
                            status_code=507 if reply.data.get("disk_full") else 422)
    return JSONResponse({"ok": True, "message": reply.message, "command": "queue_add",
                         "request_id": reply.data.get("request_id"), "queued": True, "name": name},
                        status_code=201)


def _form_options(form: Any, priority: Priority, force: bool) -> tuple[Priority, bool]:
    """The form's `priority` and `force` (over the query's): a value that is none of the declared
    ones is a 422, never silently the default. A boolean form field is the text true or false.
    Like the JSON bodies, the form has no other fields."""
    errors: list[dict[str, Any]] = [
        {"type": "extra_forbidden", "loc": ("body", str(key)[:100]), "input": None,
         "msg": "Extra inputs are not permitted (the fields are file, priority and force)"}
        for key in dict.fromkeys(form.keys()) if key not in FORM_FIELDS]
    value = form.get("priority")
    if value is not None:
        try:
            priority = Priority(str(value))
        except ValueError:
            errors.append({"type": "enum", "loc": ("body", "priority"), "input": str(value)[:100],
                           "msg": "Input should be 'high', 'normal' or 'low'"})
    value = form.get("force")
    if value is not None:
        text = str(value).strip().lower()
        if text in ("true", "false"):
            force = text == "true"
        else:
            errors.append({"type": "bool_parsing", "loc": ("body", "force"), "input": str(value)[:100],
                           "msg": "Input should be true or false"})
    if errors:
        raise RequestValidationError(errors)
    return priority, force


# the body is read as a stream (never all in memory), so FastAPI sees no body parameter: declared here
_FILE = {"type": "string", "format": "binary", "minLength": 1}
UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "description": "the JSONL file: a multipart form with the file in the field `file`, or the file "
                   "itself as the body (its name from `?name=`). Empty files are refused (400).",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object", "required": ["file"], "additionalProperties": False,
                "properties": {
                    "file": {**_FILE, "description": "the file; its file name names the job"},
                    "priority": {**ref("Priority"), "description": "overrides ?priority="},
                    "force": {"type": "boolean", "description": "overrides ?force="},
                },
            },
        },
        **{t: {"schema": {**_FILE, "description": "the file's bytes"}} for t in sorted(RAW_TYPES)
           if t != "application/json"},
        # a JSONL file is not one JSON document: the bytes are stored as sent, never parsed here
        "application/json": {"schema": {"description": "the file's bytes (a one-line JSONL file is "
                                                       "one JSON value)"}},
    },
}
UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    201: {"model": UploadQueued, "description": "the running daemon queued the file"},
    202: {"model": UploadSaved,
          "description": "saved, not queued yet: the daemon is down (saved in inbox/, queued when it "
                         "starts) or did not answer in time (queued when it gets to it)"},
    400: error("an empty file, or a multipart form without a file in the field `file`, or a body "
               "that is not a well-formed multipart form"),
    415: error("neither multipart/form-data nor a JSONL content type"),
    422: {"description": "a parameter is invalid (`detail` lists them), or the daemon refused the "
                         "file (kept in queue/failed/ with the reason)",
          "content": json_content({"anyOf": [ref("HTTPValidationError"), ref("UploadRefused")]})},
    507: {"description": "the disk is full: nothing queued (a file already handed to the daemon "
                         "waits in inbox/ until there is space)",
          "content": json_content({"anyOf": [ref("UploadRefused"), ref("ErrorBody")]})},
}


@router.post("/api/queue", status_code=201, response_model=None, responses=UPLOAD_RESPONSES,
             openapi_extra={"requestBody": UPLOAD_BODY},
             summary="upload a JSONL file into the queue (multipart field 'file', or the raw body "
                     "with ?name=)")
async def upload(request: Request,
                 name: str | None = Query(None, max_length=1000,
                                          description="the file name when the file itself has none "
                                                      f"(default {DEFAULT_UPLOAD_NAME})"),
                 priority: Priority = Query(Priority.NORMAL),
                 force: bool = Query(False, description="train even if the same content was trained"),
                 svc: Services = Depends(services)) -> JSONResponse:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    inbox = svc.layout.inbox
    staged: Path | None = None
    fd: int | None = None
    try:
        if ctype == "multipart/form-data":
            # the body was capped by the security middleware before (and while) it is parsed
            async with request.form(max_files=1, max_fields=8, max_part_size=64 * 1024) as form:
                up = form.get("file")
                if not isinstance(up, UploadFile):
                    raise HTTPException(400, "multipart upload needs one file in the field 'file'")
                priority, force = _form_options(form, priority, force)
                safe = safe_name(up.filename or name or DEFAULT_UPLOAD_NAME)
                staged = _stage_path(inbox, safe)
                fd = _open_staged(staged)
                size = 0
                while chunk := await up.read(1 << 20):
                    size += len(chunk)
                    await asyncio.to_thread(_write_all, fd, chunk)
        elif ctype in RAW_TYPES:
            safe = safe_name(name or DEFAULT_UPLOAD_NAME)
            staged = _stage_path(inbox, safe)
            fd = _open_staged(staged)
            size = 0
            async for chunk in request.stream():
                if chunk:
                    size += len(chunk)
                    _write_all(fd, chunk)
        else:
            raise HTTPException(415, "upload as multipart/form-data (field 'file') or as the raw body "
                                     "with Content-Type application/x-ndjson and ?name=FILE.jsonl")
        if size == 0:
            raise HTTPException(400, "empty upload: nothing to train on")
        fdone, fd = fd, None
        await asyncio.to_thread(_finish_staged, fdone, inbox)
        log.info("upload %s (%d bytes) staged as inbox/%s", safe, size, staged.name)
        handed, staged = staged, None        # from here on the daemon (or inbox/) owns the file
        return await asyncio.to_thread(_hand_over, svc, handed, safe, priority, force)
    except BaseException:
        if fd is not None:
            os.close(fd)
            fd = None
        if staged is not None:
            staged.unlink(missing_ok=True)
            staged = None
        raise
    finally:
        if fd is not None:
            os.close(fd)
