"""What /openapi.json declares beyond what FastAPI derives from the routes, so that generated
clients and schemathesis see the API as it answers.

The routes declare their own answers (404, 409, 503, ...) with the shapes below. The answers of
:class:`monitor.security.SecurityMiddleware`, which runs before any route, are added here to every
operation once the routes are registered (:func:`install`):

- every operation: 400 (missing, repeated or malformed Host) and 421 (a Host that is not allowed);
- every change (POST, PUT, PATCH, DELETE): the required header ``X-Trainer-Request: 1``, 403
  (without it, or with a foreign Origin/Referer), 413 (a body over the limit), 415 (``text/plain``
  or a url-encoded form) and 400 (a malformed Content-Length);
- with a token set: 401 and the token's security schemes on ``/api/*`` and ``/metrics``.

A method a path lacks is 405 with that path's own ``Allow``; an OpenAPI operation is one method,
so that answer belongs to no operation and is not listed.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import validation_error_definition, validation_error_response_definition
from pydantic import BaseModel, Field

from monitor.security import MUTATING_METHODS, REQUEST_HEADER, token_required


# ---- shapes -------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every refusal: the middleware's, an HTTPException's, a full disk's."""
    detail: str = Field(description="what went wrong, in words")


class ControlReply(BaseModel):
    """The daemon's answer to a control request."""
    ok: Literal[True]
    message: str = Field(description="the daemon's answer, in words")
    command: str = Field(description="the control command that was sent")
    request_id: str | None = Field(description="the id of the request file in control/; null when "
                                             "no daemon ran and the monitor applied it itself")


class UploadQueued(BaseModel):
    """201: the file is in the queue: the running daemon took it, or, with no daemon running, the
    monitor queued it itself under the daemon lock (as trainer-ctl does)."""
    ok: Literal[True]
    queued: Literal[True]
    name: str = Field(description="the file's name in the queue (a safe form of the given name)")
    message: str
    command: str
    request_id: str | None = Field(description="the control request's id; null when the monitor queued it")


class UploadSaved(BaseModel):
    """202: the file is saved but not queued yet: the daemon did not answer in time (it queues
    the file when it gets to it), or another operation held the daemon lock (the file waits in
    inbox/ and is queued at the next daemon start)."""
    ok: Literal[True]
    queued: Literal[False]
    name: str = Field(description="the file's name in inbox/ (or, handed to the daemon, in the queue)")
    message: str


class UploadRefused(BaseModel):
    """422/507: the daemon refused the file (kept in queue/failed/ with the reason) or had no disk
    space (the file waits in inbox/)."""
    ok: Literal[False]
    queued: Literal[False]
    name: str
    message: str
    detail: str


MODELS: tuple[type[BaseModel], ...] = (ErrorBody, ControlReply, UploadQueued, UploadSaved, UploadRefused)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def error(description: str) -> dict[str, Any]:
    """A ``responses`` entry for a refusal with an :class:`ErrorBody`."""
    return {"description": description, "model": ErrorBody}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


# the answers of routes that hand a request to the daemon (Services.send_control)
DAEMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: error("the daemon refused the request (the reason is in `detail`)"),
    503: error("the daemon is not running: nothing was sent"),
    504: error("the daemon did not answer in time; the request stays in control/ and is applied "
               "when it gets to it"),
    507: error("the disk is full: nothing was changed (the daemon paused for it)"),
}
# the answers of queue operations (Services.queue_op): applied by the daemon, or here when it is down
QUEUE_OP_RESPONSES: dict[int | str, dict[str, Any]] = {
    **DAEMON_RESPONSES,
    503: error("another operation (trainer-ctl) held the daemon lock for a minute: nothing was changed"),
    507: error("the disk is full: nothing was changed"),
}
NOT_FOUND = {404: error("no job has exactly this queue name")}
BAD_JSON = {400: error("the body is not valid JSON")}

# ---- what the middleware answers ----------------------------------------------------------------
HOST_400 = "missing, repeated or malformed Host header"
HOST_421 = ("the Host header names a host that is not allowed (DNS rebinding protection; add it to "
            "monitor.allowed_hosts)")
CHANGE_400 = "malformed Content-Length"
CHANGE_403 = ("the header `X-Trainer-Request: 1` is missing (every change must carry it), or the request "
              "carries a foreign Origin or Referer (changes from other sites' pages are refused)")
CHANGE_415 = ("Content-Type text/plain or application/x-www-form-urlencoded (the types any web page "
              "can send cross-site) is never accepted")
TOKEN_401 = "missing or wrong token (`Authorization: Bearer TOKEN` or `X-Trainer-Token: TOKEN`)"


def _too_large(limit: int, setting: str) -> str:
    return f"the body is larger than {limit} bytes ({setting}): refused before it is used"


def _add(op: dict[str, Any], code: int, description: str, schema: dict[str, Any] | None = None,
         headers: dict[str, Any] | None = None) -> None:
    """Declare *code* on *op*, or add *description* to the one the route declares."""
    responses = op.setdefault("responses", {})
    entry = responses.get(str(code))
    if entry is None:
        responses[str(code)] = entry = {"description": description,
                                        "content": json_content(schema or ref("ErrorBody"))}
    elif description not in entry.get("description", ""):
        entry["description"] = f"{entry['description']}; or {description}" if entry.get("description") \
            else description
        entry.setdefault("content", json_content(schema or ref("ErrorBody")))
    if headers:
        entry.setdefault("headers", {}).update(headers)


def declare_middleware(schema: dict[str, Any], *, token: bool, upload_paths: frozenset[str],
                       max_upload_bytes: int, max_body_bytes: int) -> dict[str, Any]:
    """Add the middleware's answers (and the shapes they use) to every operation of *schema*."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in MODELS:
        schemas.setdefault(model.__name__,
                           model.model_json_schema(ref_template="#/components/schemas/{model}"))
    schemas.setdefault("ValidationError", validation_error_definition)
    schemas.setdefault("HTTPValidationError", validation_error_response_definition)
    if token:
        components.setdefault("securitySchemes", {}).update({
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "monitor.token or TRAINER_MONITOR_TOKEN"},
            "tokenHeader": {"type": "apiKey", "in": "header", "name": "X-Trainer-Token"},
            "tokenQuery": {"type": "apiKey", "in": "query", "name": "token",
                           "description": "GET only (EventSource cannot send headers)"},
        })
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method.upper() not in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}:
                continue
            _add(op, 400, HOST_400)
            _add(op, 421, HOST_421)
            if token and token_required(path):
                safe = method.upper() in ("GET", "HEAD")
                op["security"] = [{"bearer": []}, {"tokenHeader": []},
                                  *([{"tokenQuery": []}] if safe else [])]
                _add(op, 401, TOKEN_401, headers={"WWW-Authenticate": {
                    "description": "Bearer realm=\"trainer-monitor\"", "schema": {"type": "string"}}})
            if method.upper() in MUTATING_METHODS:
                params = op.setdefault("parameters", [])
                if not any(p.get("in") == "header" and p.get("name", "").lower() == REQUEST_HEADER
                           for p in params):
                    params.append({"name": "X-Trainer-Request", "in": "header", "required": True,
                                   "description": "every change carries it (web pages of other sites "
                                                  "cannot send it)",
                                   "schema": {"type": "string", "enum": ["1"]}})
                _add(op, 400, CHANGE_400)
                _add(op, 403, CHANGE_403)
                if path in upload_paths:
                    _add(op, 413, _too_large(max_upload_bytes, "monitor.max_upload_bytes"))
                else:
                    _add(op, 413, _too_large(max_body_bytes, "the limit for a request that is no upload"))
                _add(op, 415, CHANGE_415)
            op["responses"] = dict(sorted(op["responses"].items()))
    return schema


def install(app: FastAPI, *, token: bool, upload_paths: frozenset[str], max_upload_bytes: int,
            max_body_bytes: int) -> None:
    """Make ``app.openapi()`` (and so /openapi.json and /docs) include the middleware's answers."""
    base: Callable[[], dict[str, Any]] = app.openapi
    done = False

    def openapi() -> dict[str, Any]:
        nonlocal done
        schema = base()              # FastAPI's, cached in app.openapi_schema
        if not done:
            declare_middleware(schema, token=token, upload_paths=upload_paths,
                               max_upload_bytes=max_upload_bytes, max_body_bytes=max_body_bytes)
            done = True
        return schema
    app.openapi = openapi            # type: ignore[method-assign]


__all__ = ["ErrorBody", "ControlReply", "UploadQueued", "UploadSaved", "UploadRefused", "DAEMON_RESPONSES",
           "NOT_FOUND", "BAD_JSON", "error", "ref", "json_content", "install", "declare_middleware"]
