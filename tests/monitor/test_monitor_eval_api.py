"""GET /api/eval (the Retention panel's data) against a real monitor subprocess: the forgetting
matrix from state.db as the daemon records it, held and promoted adapters marked, a plain reason
when there is none, and the stream's ``eval`` event."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core import evaltable
from core.paths import Layout
from core.statedb import StateDB
from daemon_helpers import wait_for
from monitor_helpers import Monitor, SSEReader, make_home
from retention_helpers import ADD_SNAPSHOT, HELD_REASON, HELD_SNAPSHOT, XSS_DATASET, row, write_matrix


def _db(home: Path) -> StateDB:
    return StateDB(Layout(home).state_db)


def _event(home: Path, kind: str, snapshot: str) -> None:
    """A promote / rollback as core/promotion.py records it."""
    db = _db(home)
    try:
        db.add_event(kind, f"{kind} {snapshot}", data={"action": "rollback" if kind == "rolled_back" else "promote",
                                                       "snapshot": snapshot})
    finally:
        db.close()


def test_no_matrix_is_a_plain_reason(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    mon = Monitor(home.path).start()
    try:
        with mon.client() as c:
            e = c.get("/api/eval").json()           # no state.db at all yet
            assert e["available"] is False and e["columns"] == [] and e["datasets"] == []
            assert "state.db" in e["reason"]
            _db(home.path).close()                   # the daemon's first start creates it
            e = c.get("/api/eval").json()
            assert e["available"] is False
            assert e["reason"] == ("no retention evaluations yet: they appear after the first job with "
                                   "eval_fraction > 0")
            home.write_config(eval_fraction=0)       # turned off: it says so
            e = c.get("/api/eval").json()
            assert e["available"] is False and "eval_fraction is 0 in config.json" in e["reason"]
    finally:
        mon.stop()


def test_the_matrix_with_held_promoted_and_rolled_back_adapters(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    write_matrix(home.path)
    mon = Monitor(home.path).start()
    try:
        with mon.client() as c:
            e = c.get("/api/eval").json()
            assert e["available"] is True and e["reason"] is None
            assert [(col["after_job"], col["name"]) for col in e["columns"]] == [(1, XSS_DATASET), (2, "reverse.jsonl")]
            first, second = e["columns"]
            assert first["held"] is None and first["promoted"] is None and first["current"] is True
            assert second["held"] == {"reason": HELD_REASON, "snapshot": HELD_SNAPSHOT, "at": second["held"]["at"]}
            assert second["gate"] == HELD_REASON and second["current"] is False and second["promoted"] is None
            assert e["current_job"] == 1 and e["total_columns"] == 2 and e["hidden_columns"] == 0
            # one row per dataset, the reference set first; changes since each was learned
            assert [(d["job_id"], d["name"], d["reference"]) for d in e["datasets"]] == \
                [(0, "reference: general.jsonl", True), (1, XSS_DATASET, False), (2, "reverse.jsonl", False)]
            ref, add, rev = e["datasets"]
            assert ref["learned_loss"] == pytest.approx(18.5768)            # the base model's own loss
            assert ref["cells"][1]["change"] == pytest.approx(7.9731 - 18.5768)
            assert add["learned_loss"] == pytest.approx(2.0543)
            assert [c["after_job"] for c in add["cells"]] == [1, 2] and add["cells"][0]["change"] == 0
            assert add["cells"][1]["change"] == pytest.approx(9.1811 - 2.0543)
            assert add["cells"][1]["relative_change"] == pytest.approx((9.1811 - 2.0543) / 2.0543)
            assert add["cells"][1]["tokens"] == 240 and add["cells"][1]["skipped"] is None
            assert [c["after_job"] for c in rev["cells"]] == [2]
            # the same as trainer-ctl eval's matrix (core/evaltable.py)
            db = _db(home.path)
            try:
                m = evaltable.matrix(evaltable.read_rows(db))
            finally:
                db.close()
            assert [d["cells"][-1]["loss"] for d in m["datasets"]] == [d["cells"][-1]["loss"] for d in e["datasets"]]

            # trainer-ctl promote of the held candidate (core/promotion.py's event and switched state)
            db = _db(home.path)
            try:
                db.add_event("promoted", f"promoted snapshots/{HELD_SNAPSHOT}: current_model/ now holds 2 dataset(s)",
                             data={"action": "promote", "snapshot": f"snapshots/{HELD_SNAPSHOT}",
                                   "previous": "snapshots/20260101_000300__pre-promote", "at": "2026-01-01T00:03:00+00:00"})
            finally:
                db.close()
            (home.path / "current_model/trainer_state.json").write_text(json.dumps(
                {"datasets": [{"name": XSS_DATASET, "job_id": 1}, {"name": "reverse.jsonl", "job_id": 2}]}))
            e = c.get("/api/eval").json()
            first, second = e["columns"]
            assert second["promoted"]["kind"] == "promoted" and second["promoted"]["snapshot"] == HELD_SNAPSHOT
            assert second["promoted"]["at"] == "2026-01-01T00:03:00+00:00"
            assert second["held"]["reason"] == HELD_REASON          # it was held, then promoted
            assert second["current"] is True and first["current"] is False and first["promoted"] is None

            # trainer-ctl rollback to the first job's own snapshot (known from its "snapshot" event)
            _event(home.path, "rolled_back", f"snapshots/{ADD_SNAPSHOT}")
            (home.path / "current_model/trainer_state.json").write_text(json.dumps(
                {"datasets": [{"name": XSS_DATASET, "job_id": 1}]}))
            e = c.get("/api/eval").json()
            first, second = e["columns"]
            assert first["promoted"]["kind"] == "rolled_back" and first["promoted"]["snapshot"] == ADD_SNAPSHOT
            assert first["current"] is True and second["current"] is False
            assert second["promoted"]["kind"] == "promoted"               # history: it was promoted once
            # and to a backup a promote made: no event names its job, its snapshot.json does
            backup = home.path / "snapshots/20260101_000300__pre-promote"
            backup.mkdir(parents=True)
            (backup / "snapshot.json").write_text(json.dumps({"kind": "pre-promote", "datasets": [
                {"name": XSS_DATASET, "job_id": 1}]}))
            _event(home.path, "rolled_back", f"snapshots/{backup.name}")
            _event(home.path, "rolled_back", "snapshots/no-such-snapshot")     # unknown: marks nothing
            _event(home.path, "promoted", "../../etc")                          # never a path outside snapshots/
            first, second = c.get("/api/eval").json()["columns"]
            assert first["promoted"]["snapshot"] == backup.name and second["promoted"]["kind"] == "promoted"

            # the newest N adapters only
            e1 = c.get("/api/eval", params={"columns": 1}).json()
            assert [col["after_job"] for col in e1["columns"]] == [2]
            assert e1["total_columns"] == 2 and e1["hidden_columns"] == 1
            assert [len(d["cells"]) for d in e1["datasets"]] == [1, 1, 1]
            assert c.get("/api/eval", params={"columns": 0}).status_code == 422
    finally:
        mon.stop()


def test_skipped_and_non_finite_cells_and_the_stream(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    write_matrix(home.path)
    mon = Monitor(home.path).start()
    reader = SSEReader(mon.base + "/api/stream").start()
    try:
        wait_for(lambda: reader.of("eval"), timeout=5, what="the eval event on connect")
        assert [col["after_job"] for col in reader.of("eval")[-1][1]["columns"]] == [1, 2]
        db = _db(home.path)
        try:
            evaltable.add_rows(db, 3, "more.jsonl", [row(0, "reference: general.jsonl", math.nan, baseline=18.5768),
                                                     row(1, XSS_DATASET, None, skipped="time budget spent"),
                                                     row(3, "more.jsonl", math.inf)])
        finally:
            db.close()
        got = wait_for(lambda: next((d for _, d in reader.of("eval") if len(d["columns"]) == 3), None),
                       timeout=5, what="the new column pushed")
        cells = {d["job_id"]: d["cells"][-1] for d in got["datasets"]}
        assert cells[0]["loss"] is None and cells[0]["change"] is None           # NaN: no number
        assert cells[1] == {"after_job": 3, "loss": None, "change": None, "relative_change": None, "tokens": 240,
                            "skipped": "time budget spent"}
        assert cells[3]["loss"] is None
        with mon.client() as c:
            e = c.get("/api/eval")
            assert e.status_code == 200 and e.json()["datasets"] == got["datasets"]
            spec = c.get("/openapi.json").json()
            op = spec["paths"]["/api/eval"]["get"]
            assert op["responses"]["200"]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/EvalMatrix"}
            assert {"EvalMatrix", "EvalColumn", "HeldMark", "MoveMark", "EvalDataset", "EvalCell"} <= \
                set(spec["components"]["schemas"])
            stream = spec["paths"]["/api/stream"]["get"]["responses"]["200"]["content"]["text/event-stream"]
            assert "eval" in stream["schema"]["properties"]["event"]["enum"]
    finally:
        reader.stop()
        mon.stop()
