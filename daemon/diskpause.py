"""The daemon's pause for a full disk: entered on any write that finds no space, left by
itself once ``min_free_disk_mb`` (and the reserve) is free again.

Part of :class:`daemon.main.Daemon` (a mixin: the state lives in ``Daemon.__init__``).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from core.diskfull import MIB, describe as describe_disk, free_bytes
from core.interface import Command
from core.states import DaemonStatus
from daemon.status import iso

if TYPE_CHECKING:
    from daemon.main import Daemon

log = logging.getLogger("trainerd")


class DiskPause:
    """Enter and leave the disk-full pause (see the module doc)."""

    def _enter_disk_full(self: "Daemon", cause: str) -> None:
        """Pause for a full disk: say so everywhere we still can, pause the worker. Never raises."""
        msg = describe_disk(self.layout.home)
        self._disk_check_at = time.monotonic() + self.config.disk_retry_interval_s
        if self._disk_full is not None:
            self._disk_full = msg
            return
        self._disk_full = msg
        self.reserve.release()          # room to write the status and the event that say so
        log.error("paused: %s (%s); training resumes by itself when space is back", msg, cause)
        if self.runner is not None and self.runner.is_alive():
            self.runner.control.send(Command.PAUSE)
        try:
            self.db.add_event("disk_full", f"paused: {msg} ({cause})", level="error")
            self.board.update(paused=True, paused_reason=msg,
                              last_error={"message": f"paused: {msg}", "at": iso(), "kind": "disk_full"})
            self.board.set_status(DaemonStatus.PAUSED)
        except Exception:   # noqa: BLE001 - the log line above is all we can do
            log.exception("could not record the disk-full pause")

    def _disk_recovered(self: "Daemon") -> bool:
        """In a disk-full pause: look again every disk_retry_interval_s; True once space is back."""
        if time.monotonic() < self._disk_check_at:
            return False
        self._disk_check_at = time.monotonic() + self.config.disk_retry_interval_s
        # min_free_disk_mb must be free with the reserve made again (as _start_next counts it), or
        # the reserve would take the space back and the next job start would pause again: a loop
        need = self.config.min_free_disk_mb * MIB + self.reserve.missing()
        if free_bytes(self.layout.home) < need or not self.reserve.ensure():
            msg = describe_disk(self.layout.home)
            if msg != self._disk_full:
                self._disk_full = msg
                self.board.update(paused_reason=msg)
            return False
        self.board.update(paused=self.paused, paused_reason="paused by user" if self.paused else None)
        self.board.flush(force=True)
        if self.board.write_error is not None:
            return False
        log.warning("disk space is back %s: %s", describe_disk(self.layout.home).replace("disk full ", ""),
                    "staying paused (paused by user)" if self.paused else "resuming")
        self.db.add_event("disk_ok", f"disk space is back ({free_bytes(self.layout.home) / MIB:.0f} MiB "
                          f"free); {'still paused by user' if self.paused else 'resuming'}")
        self._disk_full = None
        if self.runner is not None and self.runner.is_alive():
            if not self.paused:
                self.runner.control.send(Command.RESUME)
        elif self._stop_reason is None:
            self.board.set_status(DaemonStatus.PAUSED if self.paused else DaemonStatus.IDLE)
        return True
