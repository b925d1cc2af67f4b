"""The monitor's API against a real uvicorn subprocess fed by a real daemon (stand-in trainer)."""
from __future__ import annotations

import json
import time
from typing import Iterator

import httpx
import pytest

from daemon_helpers import text_records, wait_for, write_jsonl
from monitor_helpers import (REQ, Monitor, SSEReader, make_home, prometheus_samples, promtool_problems,
                             stop_daemon)

STEP_S = 0.1


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    home = make_home(tmp_path_factory.mktemp("api") / "home", standin_step_seconds=STEP_S)
    home.launch()
    mon = Monitor(home.path).start()
    # a long job keeps the daemon busy, so files added later stay pending
    write_jsonl(home.path / "inbox" / "long.jsonl", text_records(2000, "long"))
    wait_for(lambda: home.status().get("current_file") == "long.jsonl", timeout=20, what="long job starts")
    try:
        yield home, mon
    finally:
        mon.stop()
        home.kill_all()


def api(mon: Monitor) -> httpx.Client:
    return mon.client()


def test_status_queue_metrics_while_training(stack) -> None:
    home, mon = stack
    with api(mon) as c:
        wait_for(lambda: (c.get("/api/status").json().get("current_step") or 0) >= 3, timeout=10,
                 what="steps")
        st = c.get("/api/status").json()
        assert st["daemon_running"] is True and st["daemon_pid"] == home.pid()
        assert st["status"] == "training" and st["current_file"] == "long.jsonl"
        assert st["total_steps"] == 2000 and st["trainer"] == "standin"
        assert st["queue"]["processing"] == 1

        q = c.get("/api/queue").json()
        assert q["available"] is True
        job = q["jobs"]["processing"][0]
        assert job["name"] == "long.jsonl" and job["state"] == "processing" and job["records"] == 2000
        for key in ("priority", "size", "attempts", "error"):
            assert key in job

        wait_for(lambda: c.get("/api/metrics", params={"limit": 1}).json()["total"] >= 6, timeout=5,
                 what="metrics lines")
        m = c.get("/api/metrics", params={"limit": 5}).json()
        assert m["count"] == 5 and m["total"] >= 6 and m["more"] is True
        steps = [r["step"] for r in m["records"]]
        assert steps == sorted(steps)
        assert all(r["file"] == "long.jsonl" and "seq" in r for r in m["records"])
        newer = c.get("/api/metrics", params={"since_seq": m["next_seq"]}).json()
        assert all(r["seq"] > m["next_seq"] for r in newer["records"])
        since = c.get("/api/metrics", params={"since": steps[-1] - 2, "limit": 100}).json()
        assert since["records"] and all(r["step"] > steps[-1] - 2 for r in since["records"])

        ev = c.get("/api/events", params={"limit": 50}).json()
        kinds = [e["kind"] for e in ev["events"]]
        assert "daemon_start" in kinds and "accepted" in kinds and "started" in kinds

        logs = c.get("/api/logs", params={"lines": 20}).json()
        assert logs["daemon"]["file"].startswith("daemon_2") and logs["daemon"]["lines"]
        assert len(logs["daemon"]["lines"]) <= 20
        assert "lines" in logs["training"]

        lay = c.get("/api/layers").json()
        assert lay["available"] is False and "stand-in trainer" in lay["reason"]

        gpu = c.get("/api/gpu").json()
        if gpu["available"]:
            g = gpu["gpus"][0]
            assert {"utilization_percent", "memory_used_bytes", "memory_total_bytes", "temperature_c",
                    "power_w", "clock_sm_mhz", "processes"} <= set(g)
        else:
            assert gpu["reason"].startswith("no NVIDIA GPU detected (")

        mem = c.get("/api/memory").json()
        assert mem["system"]["total_bytes"] > 0 and mem["daemon_pid"] == home.pid()
        assert mem["daemon"]["rss_bytes"] > 0 and mem["disk"]["free_bytes"] > 0
        assert isinstance(mem["workers"], list)

        prom = c.get("/metrics")
        assert prom.status_code == 200 and prom.headers["content-type"].startswith("text/plain")
        got = prometheus_samples(prom.text)
        assert got["trainer_daemon_up"] == {(): 1}
        assert got["trainer_status"][(("status", "training"),)] == 1
        assert got["trainer_jobs"][(("state", "processing"),)] == 1
        assert got["trainer_queue_files"][(("state", "processing"),)] == 1
        assert got["trainer_step"][()] >= 3 and "trainer_gpu_available" in got
        # the daemon adds the steps to state.db's counters each status interval: live within one
        step_now = got["trainer_step"][()]
        wait_for(lambda: prometheus_samples(c.get("/metrics").text)["trainer_steps_total"][()] >= step_now,
                 timeout=10, what="trainer_steps_total to reach the running job's step")
        assert promtool_problems(prom.text) in (None, "")
        assert c.get("/healthz").json() == {"ok": True}
        assert c.get("/openapi.json").json()["info"]["title"]


def test_stream_delivers_status_change_within_one_second(stack) -> None:
    home, mon = stack
    reader = SSEReader(mon.base + "/api/stream").start()
    try:
        wait_for(lambda: reader.of("status") and reader.of("queue") and reader.of("metrics")
                 and reader.of("layers") and reader.of("system_history") and reader.of("logs")
                 and reader.of("events"), timeout=5, what="initial snapshot")
        assert reader.of("status")[-1][1]["status"] == "training"
        n_metrics = len(reader.of("metrics"))
        wait_for(lambda: len(reader.of("metrics")) > n_metrics, timeout=3, what="new metrics pushed")

        r = home.ctl("pause")
        assert r.returncode == 0, r.stderr
        # when did the status file first say "paused"? (the test polls the file itself)
        changed = wait_for(lambda: time.monotonic() if home.status().get("status") == "paused" else None,
                           timeout=5, interval=0.01, what="status file says paused")
        got = wait_for(lambda: next((t for t, d in reader.of("status") if d["status"] == "paused"), None),
                       timeout=3, interval=0.01, what="stream says paused")
        assert got - changed < 1.0, f"status change took {got - changed:.2f}s to arrive"
        # and back
        assert home.ctl("resume").returncode == 0
        wait_for(lambda: reader.of("status")[-1][1]["status"] == "training", timeout=3, what="resumed")
        wait_for(lambda: any(e["kind"] == "paused" for _, d in reader.of("events") for e in d["events"]),
                 timeout=3, what="paused event pushed")
    finally:
        reader.stop()


def test_control_pause_resume_through_api(stack) -> None:
    home, mon = stack
    with api(mon) as c:
        r = c.post("/api/control/pause", headers=REQ)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ok"] is True and "pause" in body["message"]
        wait_for(lambda: c.get("/api/status").json()["status"] == "paused", timeout=3, what="paused")
        r = c.post("/api/control/resume", headers=REQ)
        assert r.status_code == 200 and r.json()["message"] == "resumed"
        wait_for(lambda: c.get("/api/status").json()["status"] == "training", timeout=3, what="training")
        assert c.post("/api/control/explode", headers=REQ).status_code == 404
        assert c.get("/api/control/pause").status_code in (404, 405)


def test_upload_and_queue_operations(stack) -> None:
    home, mon = stack
    with api(mon) as c:
        body = "".join(json.dumps(r) + "\n" for r in text_records(5, "raw"))
        r = c.post("/api/queue", params={"name": "raw data.jsonl", "priority": "low"}, content=body,
                   headers={**REQ, "Content-Type": "application/x-ndjson"})
        assert r.status_code == 201, r.text
        assert r.json()["queued"] is True and r.json()["name"] == "raw_data.jsonl"

        files = {"file": ("multi.jsonl", "".join(json.dumps(x) + "\n" for x in text_records(4, "mp")),
                          "application/octet-stream")}
        r = c.post("/api/queue", files=files, data={"priority": "high"}, headers=REQ)
        assert r.status_code == 201, r.text

        pending = {j["name"]: j for j in c.get("/api/queue").json()["jobs"]["pending"]}
        assert pending["raw_data.jsonl"]["priority"] == "low"
        assert pending["multi.jsonl"]["priority"] == "high"
        assert pending["multi.jsonl"]["position"] < pending["raw_data.jsonl"]["position"]
        assert not [p for p in (home.path / "inbox").iterdir()], "staged files must be gone"

        # same content again: the daemon rejects it into failed/ with the reason
        r = c.post("/api/queue", params={"name": "again.jsonl"}, content=body,
                   headers={**REQ, "Content-Type": "application/x-ndjson"})
        assert r.status_code == 422 and "duplicate" in r.json()["message"]

        r = c.post("/api/queue/raw_data.jsonl/priority", json={"level": "high"}, headers=REQ)
        assert r.status_code == 200, r.text
        assert "high" in r.json()["message"]
        assert c.post("/api/queue/raw_data.jsonl/priority", json={"level": "urgent"},
                      headers=REQ).status_code == 422
        # only pending jobs have a priority / can be removed; only failed ones retried
        assert c.post("/api/queue/long.jsonl/priority", json={"level": "low"}, headers=REQ).status_code == 409
        assert c.delete("/api/queue/long.jsonl", headers=REQ).status_code == 409
        assert c.post("/api/queue/multi.jsonl/retry", headers=REQ).status_code == 409

        r = c.delete("/api/queue/raw_data.jsonl", headers=REQ)
        assert r.status_code == 200, r.text
        failed = {j["name"]: j for j in c.get("/api/queue").json()["jobs"]["failed"]}
        assert failed["raw_data.jsonl"]["error"] == "removed by user"
        assert (home.path / "queue/failed/raw_data.jsonl").exists()

        r = c.post("/api/queue/raw_data.jsonl/retry", headers=REQ)
        assert r.status_code == 200, r.text
        assert "raw_data.jsonl" in {j["name"] for j in c.get("/api/queue").json()["jobs"]["pending"]}
        r = c.post("/api/queue/again.jsonl/retry", json={"force": True}, headers=REQ)
        assert r.status_code == 200, r.text

        for bad in ("nope.jsonl", "..", "long", "LONG.JSONL"):
            assert c.delete(f"/api/queue/{bad}", headers=REQ).status_code == 404


def test_skip_then_stop_then_daemon_down(stack) -> None:
    """Last in this module: it stops the daemon."""
    home, mon = stack
    with api(mon) as c:
        r = c.post("/api/control/skip", headers=REQ)
        assert r.status_code == 200 and "skip" in r.json()["message"]
        wait_for(lambda: "long.jsonl" in home.files("failed"), timeout=5, what="skipped job in failed/")
        # stop: with nothing else to do fast, stop the daemon through the API
        assert c.post("/api/control/pause", headers=REQ).status_code == 200
        r = c.post("/api/control/stop", headers=REQ)
        assert r.status_code == 200, r.text
        wait_for(lambda: home.pid() is None, timeout=15, what="daemon exit")
        st = wait_for(lambda: (lambda s: s if s["status"] == "daemon not running" else None)(
            c.get("/api/status").json()), timeout=5, what="status down")
        assert st["daemon_running"] is False and st["daemon_pid"] is None
        assert st["daemon_down_since"] and st["message"].startswith("daemon not running since ")
        assert st["file_status"] == "stopped"

        r = c.post("/api/control/pause", headers=REQ)
        assert r.status_code == 503 and "daemon not running" in r.json()["detail"]
        # a queue operation needs no daemon: the monitor applies it under the daemon lock
        r = c.post("/api/queue/long.jsonl/retry", headers=REQ)
        assert r.status_code == 200 and "moved back to pending" in r.json()["message"], r.text
        assert "long.jsonl" in home.files("pending")
        assert c.delete("/api/queue/long.jsonl", headers=REQ).status_code == 200

        # the monitor keeps serving everything with the daemon down
        for path in ("/api/queue", "/api/metrics", "/api/events", "/api/logs", "/api/layers",
                     "/api/gpu", "/api/memory", "/metrics"):
            assert c.get(path).status_code == 200, path
        assert prometheus_samples(c.get("/metrics").text)["trainer_daemon_up"] == {(): 0}
        mem = c.get("/api/memory").json()
        assert mem["daemon"] is None and mem["process_reason"] == "daemon not running"

        # an upload with the daemon down is queued by the monitor itself, as trainer-ctl does
        # (daemon/queueops.py under the daemon lock); the same content again is a duplicate
        body = "".join(json.dumps(r) + "\n" for r in text_records(3, "offline"))
        r = c.post("/api/queue", params={"name": "offline.jsonl"}, content=body,
                   headers={**REQ, "Content-Type": "application/x-ndjson"})
        assert r.status_code == 201, r.text
        assert r.json()["queued"] is True and r.json()["request_id"] is None
        assert "queued offline.jsonl as offline.jsonl" in r.json()["message"]
        assert (home.path / "queue/pending/offline.jsonl").read_text() == body
        r = c.post("/api/queue", params={"name": "offline.jsonl"}, content=body,
                   headers={**REQ, "Content-Type": "application/x-ndjson"})
        assert r.status_code == 422 and "duplicate" in r.json()["detail"], r.text
        assert (home.path / "queue/failed/offline.2.jsonl").exists()
        # and the other queue operations too: no daemon needed
        r = c.post("/api/queue/offline.jsonl/priority", json={"level": "high"}, headers=REQ)
        assert r.status_code == 200 and r.json()["request_id"] is None, r.text
        assert c.get("/api/queue/offline.jsonl").json()["priority"] == "high"
        assert c.delete("/api/queue/offline.jsonl", headers=REQ).status_code == 200
        assert (home.path / "queue/failed/offline.jsonl").exists()
        inbox = sorted(p.name for p in (home.path / "inbox").iterdir())
        assert inbox == []
    stop_daemon(home)
