"""Control requests: trainer-ctl and the monitor write them; the daemon reads and answers them.

A request is one JSON file in ``control/`` (written atomically, hidden temp name first), named
so that ``sorted()`` is arrival order. The daemon acts on it, writes ``control/replies/ID.json``
and removes the request. Senders never touch the queue or the trainer directly.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_json
from core.lock import daemon_running
from core.paths import Layout

log = logging.getLogger("trainerd.control")

TRAINING_COMMANDS = ("pause", "resume", "skip", "stop")
QUEUE_COMMANDS = ("queue_add", "queue_remove", "queue_retry", "queue_prioritize")
COMMANDS = TRAINING_COMMANDS + QUEUE_COMMANDS + ("preset_switch",)


ID_RE = re.compile(r"^[0-9A-Za-z-]{1,64}$")
MAX_AGE_S = 300.0      # a request nobody acted on for this long is answered "expired", not applied


class ControlError(ValueError):
    pass


def check_request(req: object) -> str | None:
    """Why *req* is not a well-formed request, or None."""
    if not isinstance(req, dict):
        return "not a JSON object"
    if req.get("command") not in COMMANDS:
        return f"unknown command {req.get('command')!r}"
    if not isinstance(req.get("id"), str) or not ID_RE.match(req["id"]):
        return "missing or malformed id"
    if not isinstance(req.get("args", {}), dict):
        return "args must be an object"
    return None


def replies_dir(layout: Layout) -> Path:
    return layout.control / "replies"


def write_request(layout: Layout, command: str, *, source: str = "cli", **args: Any) -> str:
    """Queue a request for the daemon; returns its id (to wait for the reply)."""
    if command not in COMMANDS:
        raise ControlError(f"unknown command '{command}' (known: {', '.join(COMMANDS)})")
    layout.control.mkdir(parents=True, exist_ok=True)
    req_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    atomic_write_json(layout.control / f"{req_id}.json", {
        "id": req_id, "command": command, "args": args, "source": source,
        "requested_at": time.time(), "pid": os.getpid()})
    return req_id


def pending_requests(layout: Layout) -> list[tuple[Path, dict[str, Any] | None]]:
    """Requests waiting, oldest first. A malformed one comes back as (path, None)."""
    out: list[tuple[Path, dict[str, Any] | None]] = []
    try:
        entries = sorted(p for p in layout.control.iterdir()
                         if p.suffix == ".json" and not p.name.startswith(".") and p.is_file())
    except FileNotFoundError:
        return out
    for p in entries:
        try:
            req = json.loads(p.read_text(encoding="utf-8"))
            problem = check_request(req)
        except (ValueError, OSError) as exc:
            problem = str(exc)
        if problem is not None:
            log.warning("malformed control request %s: %s", p.name, problem)
            out.append((p, None))
        else:
            out.append((p, req))
    return out


def set_aside(layout: Layout, path: Path) -> None:
    """Move a malformed request to control/rejected/ (kept for a human; never acted on)."""
    rejected = layout.control / "rejected"
    rejected.mkdir(exist_ok=True)
    try:
        os.replace(path, rejected / path.name)
    except FileNotFoundError:
        pass


def write_reply(layout: Layout, req_id: str, *, ok: bool, message: str,
                data: dict[str, Any] | None = None) -> None:
    d = replies_dir(layout)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / f"{req_id}.json", {"id": req_id, "ok": ok, "message": message,
                                              "data": data or {}, "answered_at": time.time()})


def wait_reply(layout: Layout, req_id: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """Wait for the daemon's answer; None if it did not come within *timeout* seconds."""
    path = replies_dir(layout) / f"{req_id}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            time.sleep(0.05)
            continue
        path.unlink(missing_ok=True)
        return reply
    return None


@dataclass
class Answer:
    """How a request to the daemon went. ``how``: "daemon" (it answered: ``ok`` and ``message`` are
    its own), "down" (no daemon runs: nothing was written), "timeout" (it did not answer in time:
    the request stays in control/ and is applied when it gets to it). ``data`` is the daemon's
    reply data plus ``request_id``."""
    ok: bool
    message: str
    how: str
    data: dict[str, Any] = field(default_factory=dict)


def round_trip(layout: Layout, command: str, args: dict[str, Any], *, source: str,
               timeout: float) -> Answer:
    """Write a request and wait for the daemon's reply: the one round trip trainer-ctl, the monitor
    and the queue operations (daemon/queueops.py) use."""
    pid = daemon_running(layout)
    if not pid:
        return Answer(False, f"daemon not running: cannot {command.replace('_', ' ')} (start it with "
                             "bin/launch_training_daemon.sh)", "down")
    req_id = write_request(layout, command, source=source, **args)
    reply = wait_reply(layout, req_id, timeout)
    if reply is None:
        return Answer(False, f"the daemon (pid {pid}) did not answer within {timeout:.0f} s; the request "
                             "stays in control/ and is applied when it gets to it", "timeout",
                      {"request_id": req_id})
    data = reply.get("data") if isinstance(reply.get("data"), dict) else {}
    return Answer(bool(reply.get("ok")), str(reply.get("message", "")), "daemon", {**data, "request_id": req_id})


def prune_replies(layout: Layout, max_age_s: float = 3600.0) -> None:
    """Remove answers nobody collected (a sender that gave up waiting)."""
    cutoff = time.time() - max_age_s
    for p in replies_dir(layout).glob("*.json"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
        except FileNotFoundError:
            pass
