"""What every trainer-ctl command shares: exit codes, the error line, the read-only state db,
and the round trip to the daemon (a control request, or a queue operation through
:func:`daemon.queueops.submit`).
"""
from __future__ import annotations

import json
import sys
from typing import Any

from core.config import base_model_value
from core.lock import daemon_running
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
    pid = daemon_running(layout)
    if not pid:
        err(f"daemon not running: cannot {command.replace('_', ' ')} (start it with bin/launch_training_daemon.sh)")
        return EXIT_DOWN
    req = ctl.write_request(layout, command, source="cli", **cargs)
    reply = ctl.wait_reply(layout, req, REPLY_TIMEOUT_S)
    if reply is None:
        err(f"daemon (pid {pid}) did not answer within {REPLY_TIMEOUT_S:.0f} s; the request stays in control/")
        return EXIT_TIMEOUT
    print(reply["message"]) if reply["ok"] else err(reply["message"])
    return EXIT_OK if reply["ok"] else EXIT_FAIL


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
