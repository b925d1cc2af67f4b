"""What every trainer-ctl command shares: exit codes, the error line, the read-only state db,
and the round trip to the daemon (a control request, or a queue operation through
:func:`daemon.queueops.submit`).
"""
from __future__ import annotations

import json
import sys
from typing import Any

from core.config import base_model_value
from core.paths import Layout
from core.statedb import StateDB
from daemon import control as ctl, queueops

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_DOWN, EXIT_TIMEOUT = 0, 1, 2, 3, 4
REPLY_TIMEOUT_S = 15.0


def err(msg: str) -> None:
    print(f"trainer-ctl: {msg}", file=sys.stderr)


def open_db(layout: Layout) -> StateDB | None:
    if not layout.state_db.exists():
        return None
    return StateDB(layout.state_db, readonly=True)


def send(layout: Layout, command: str, **cargs: Any) -> int:
    """A training command (pause, resume, skip, stop) to the running daemon; its exit code."""
    a = ctl.round_trip(layout, command, cargs, source="cli", timeout=REPLY_TIMEOUT_S)
    print(a.message) if a.ok else err(a.message)
    if a.how == "down":
        return EXIT_DOWN
    if a.how == "timeout":
        return EXIT_TIMEOUT
    return EXIT_OK if a.ok else EXIT_FAIL


def submit(layout: Layout, command: str, **args: Any) -> int:
    """A queue operation, through the daemon if it runs, else applied here under its lock."""
    return report(queueops.submit(layout, command, args, source="cli", timeout=REPLY_TIMEOUT_S))


def report(reply: queueops.Reply) -> int:
    """Print a queue operation's outcome; its exit code."""
    print(reply.message) if reply.ok else err(reply.message)
    if reply.how in ("timeout", "busy"):
        return EXIT_TIMEOUT
    return EXIT_OK if reply.ok else EXIT_FAIL


def raw_config(layout: Layout) -> dict[str, Any]:
    """config.json as written, with ``base_model`` resolved through the active preset."""
    raw = json.loads(layout.config.read_text(encoding="utf-8")) if layout.config.exists() else {}
    return {**raw, "base_model": base_model_value(raw)}
