"""What the routes share: the layout, settings, tolerant readers and the system sampler."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request

from daemon import control as ctl, queueops
from core.config import Config, ConfigError, MonitorConfig, load_config
from core.lock import daemon_running
from core.paths import Layout
from daemon.status import iso
from monitor.evalview import EvalView
from monitor.metrics_index import MetricsIndex
from monitor.readers import JsonFileReader, job_counts, stat_key
from monitor.system import GpuProbe, SystemSampler

log = logging.getLogger("monitor")

CONTROL_REPLY_TIMEOUT_S = 5.0
QUEUE_ADD_REPLY_TIMEOUT_S = 10.0      # the daemon hashes and validates the file first


@dataclass
class Services:
    layout: Layout
    monitor: MonitorConfig
    token: str | None = None
    bind_host: str | None = None
    sample_interval_s: float = 2.0
    status_reader: JsonFileReader = field(init=False)
    layers_reader: JsonFileReader = field(init=False)
    metrics: MetricsIndex = field(init=False)
    gpu: GpuProbe = field(init=False)
    sampler: SystemSampler = field(init=False)
    eval_view: EvalView = field(init=False)

    def __post_init__(self) -> None:
        self.status_reader = JsonFileReader(self.layout.status_file)
        self.layers_reader = JsonFileReader(self.layout.layer_activity_file)
        self.metrics = MetricsIndex(self.layout.metrics_file)
        self.gpu = GpuProbe()
        self.sampler = SystemSampler(self.layout, self.gpu, interval=self.sample_interval_s)
        self.eval_view = EvalView(self.layout)
        self._cfg: Config | None = None
        self._cfg_key: Any = "unset"

    # ---- config (re-read when config.json changes; the monitor keeps going on a bad edit) ----
    def config(self) -> Config:
        key = stat_key(self.layout.config)
        if key != self._cfg_key:
            try:
                self._cfg = load_config(self.layout.config)
            except ConfigError as exc:
                log.warning("config.json: %s (keeping the previous settings)", exc)
                self._cfg = self._cfg or Config()
            self._cfg_key = key
        assert self._cfg is not None
        return self._cfg

    # ---- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st, reason = self.status_reader.read()
        st = dict(st) if isinstance(st, dict) else {}
        pid = daemon_running(self.layout)
        out: dict[str, Any] = {**st}
        out["file_status"] = st.get("status")
        out["daemon_running"] = pid is not None
        out["daemon_pid"] = pid if pid and pid > 0 else None
        key = stat_key(self.layout.status_file)
        out["status_age_s"] = round(time.time() - key[1] / 1e9, 3) if key else None
        if reason and not st:
            out["status_reason"] = reason
        if pid is None:
            since = st.get("updated_at")
            out["status"] = "daemon not running"
            out["daemon_down_since"] = since
            out["message"] = (f"daemon not running since {since} (last status: {st.get('status')})"
                              if since else "daemon not running (it has not written a status yet)")
        elif not st:
            out["status"] = "starting"
            out["message"] = "daemon running; it has not written its status yet"
        counts = job_counts(self.layout)
        if counts is not None:
            out["queue"] = counts
        out["now"] = iso(time.time())
        return out

    def layers(self) -> dict[str, Any]:
        table, reason = self.layers_reader.read()
        if isinstance(table, dict) and table:
            return {"available": True, **table, **({"note": reason} if reason else {})}
        every = self.config().layer_activity_every_steps
        st, _ = self.status_reader.read()
        trainer = (st or {}).get("trainer") or self.config().trainer
        if trainer == "standin":
            msg = ("no layer activity: the stand-in trainer (config \"trainer\": \"standin\") trains "
                   "no model; the QLoRA trainer reports it every "
                   f"{every} steps")
        else:
            msg = (f"no layer activity yet: it appears after the first {every} steps of a job "
                   "(layer_activity_every_steps)")
        return {"available": False, "reason": msg, "every_steps": every}

    # ---- control ---------------------------------------------------------------------------------
    def queue_op(self, command: str, *, timeout: float = CONTROL_REPLY_TIMEOUT_S, **args: Any) -> dict[str, Any]:
        """A queue operation, the way trainer-ctl does it (daemon/queueops.py): through the daemon
        when it runs, else applied here under the daemon lock. 409 when refused, 504 when the
        daemon does not answer in time, 503 when the lock stays held by another operation, 507
        for a full disk."""
        reply = queueops.submit(self.layout, command, args, source="monitor", timeout=timeout)
        return _answered(command, reply.how, reply.ok, reply.message, reply.data, unavailable="busy")

    def send_control(self, command: str, *, timeout: float = CONTROL_REPLY_TIMEOUT_S,
                     **args: Any) -> dict[str, Any]:
        """Write a control request like trainer-ctl and wait for the daemon's answer.
        503 when the daemon is down, 504 when it does not answer in time, 409 when it refuses,
        507 when it could not apply it for a full disk (it paused for it)."""
        a = ctl.round_trip(self.layout, command, args, source="monitor", timeout=timeout)
        return _answered(command, a.how, a.ok, a.message, a.data, unavailable="down")


def _answered(command: str, how: str, ok: bool, message: str, data: dict[str, Any],
              unavailable: str) -> dict[str, Any]:
    """The daemon's (or the queue's) answer as HTTP: 503 when *unavailable* (down, or the lock
    held), 504 when it did not answer in time, 507 for a full disk (Insufficient Storage), 409
    when refused."""
    if how == unavailable:
        raise HTTPException(503, message)
    if how == "timeout":
        raise HTTPException(504, message)
    if not ok:
        raise HTTPException(507 if data.get("disk_full") else 409, message)
    return {"ok": True, "message": message, "command": command, "request_id": data.get("request_id")}


def services(request: Request) -> Services:
    return request.app.state.services


def resolve_token(monitor: MonitorConfig) -> str | None:
    """TRAINER_MONITOR_TOKEN wins over monitor.token; empty means none."""
    env = os.environ.get("TRAINER_MONITOR_TOKEN")
    tok = env if env else monitor.token
    return tok.strip() if tok and tok.strip() else None
