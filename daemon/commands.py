"""The daemon's control requests: pause, resume, skip, stop and the queue operations, each
answered with a reply file (daemon/control.py) that trainer-ctl and the monitor wait for.

Part of :class:`daemon.main.Daemon` (a mixin: the state lives in ``Daemon.__init__``).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from core.diskfull import is_disk_full
from core.interface import Command
from core.states import DaemonStatus
from daemon import control as ctl, queueops
from daemon.fsqueue import QueueError
from daemon.status import iso

if TYPE_CHECKING:
    from daemon.main import Daemon

log = logging.getLogger("trainerd")


class Commands:
    """Apply control requests in the loop (see the module doc)."""

    def _handle_control(self: "Daemon") -> None:
        for path, req in ctl.pending_requests(self.layout):
            if req is None:
                ctl.set_aside(self.layout, path)
                continue
            age = time.time() - float(req.get("requested_at") or 0)
            data: dict[str, Any] = {}
            try:
                if age > ctl.MAX_AGE_S:
                    ok, message = False, f"expired: sent {age:.0f} s ago and not applied"
                else:
                    ok, message = self._apply(req["command"], req.get("args") or {})
            except QueueError as exc:
                ok, message = False, str(exc)
            except Exception as exc:
                if is_disk_full(exc):   # nothing half-done (atomic writes, transactions): pause, say so
                    self._enter_disk_full(f"{req['command']}: {type(exc).__name__}: {exc}")
                    ok, message = False, (f"{self._disk_full}: {getattr(exc, 'strerror', None) or exc}; "
                                          + ("the file waits in inbox/ and is queued when space is back"
                                             if req["command"] == "queue_add" else "nothing was changed"))
                    data = {"disk_full": True}     # the monitor answers 507
                else:
                    log.exception("control request %s failed", req.get("command"))
                    ok, message = False, f"internal error: {exc!r}"
            log.info("control %s from %s: %s", req["command"], req.get("source"), message)
            self.board.update(last_command={"command": req["command"], "source": req.get("source"),
                                            "ok": ok, "message": message, "at": iso()})
            try:
                ctl.write_reply(self.layout, req["id"], ok=ok, message=message, data=data)
            finally:
                path.unlink(missing_ok=True)
            self.board.flush(force=True)

    def _apply(self: "Daemon", command: str, args: dict[str, Any]) -> tuple[bool, str]:
        running = self.runner is not None
        if command == "pause":
            self.paused = True
            self.board.update(paused=True, paused_reason=self._disk_full or "paused by user")
            if self._disk_full is not None:
                return True, f"paused (also {self._disk_full}): stays paused when space is back"
            if running:
                self.runner.control.send(Command.PAUSE)
                return True, "pause requested: takes effect at the next step boundary"
            self.board.set_status(DaemonStatus.PAUSED)
            return True, "paused: no job will start until resume"
        if command == "resume":
            if self._disk_full is not None:
                self.paused = False
                return False, (f"{self._disk_full}: training resumes by itself when space is back "
                               f"(at least min_free_disk_mb {self.config.min_free_disk_mb:g} MiB free)")
            was = self.paused
            self.paused = False
            self.board.update(paused=False, paused_reason=None)
            if running:
                self.runner.control.send(Command.RESUME)
            elif self._stop_reason is None:
                self.board.set_status(DaemonStatus.IDLE)
            return True, "resumed" if was else "not paused; nothing to resume"
        if command == "skip":
            if not running:
                return False, "no job is running; nothing to skip"
            self.runner.control.send(Command.SKIP)
            return True, f"skip requested for {self.current.name if self.current else 'current job'}"
        if command == "stop":
            self.request_stop("trainer-ctl stop")
            return True, "stopping at the next step boundary"
        if command == "preset_switch" and running:
            return False, (f"refused: {self.current.name if self.current else 'a job'} is training; "
                           "switch presets when the queue is idle")
        if command in queueops.QUEUE_OPS:
            ok, message = queueops.apply(self.queue, command, args)
            if ok and command == "preset_switch":
                self.effective_config()
                self.db.add_event("preset", message)
            return ok, message
        return False, f"unknown command {command}"
