"""The live stream's metrics cursor: a record is sent once even when another request (a
GET /api/metrics) refreshes the shared index between the stream's refresh and its read."""
from __future__ import annotations

import json
from pathlib import Path

from core.config import MonitorConfig
from core.paths import Layout
from monitor.routes_events import _changes, _Cursor
from monitor.services import Services


def test_a_concurrent_refresh_never_makes_the_stream_send_a_record_twice(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.ensure()

    def add(step: int) -> None:
        with open(layout.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": "step", "step": step, "job_id": 1}) + "\n")

    svc = Services(layout, MonitorConfig())
    cur = _Cursor()
    add(1)
    sent = [r["seq"] for k, d in _changes(svc, cur) if k == "metrics" for r in d["records"]]
    real = svc.metrics.refresh

    def refresh_then_another_request_refreshes() -> int:
        n = real()
        add(99)          # appended by the daemon, indexed by the other request's refresh
        real()
        return n

    add(2)
    svc.metrics.refresh = refresh_then_another_request_refreshes   # type: ignore[method-assign]
    sent += [r["seq"] for k, d in _changes(svc, cur) if k == "metrics" for r in d["records"]]
    svc.metrics.refresh = real                                     # type: ignore[method-assign]
    sent += [r["seq"] for k, d in _changes(svc, cur) if k == "metrics" for r in d["records"]]
    assert sent == [0, 1, 2]
