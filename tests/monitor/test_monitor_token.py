"""The token rule: a non-loopback bind needs a token, and then every API call needs it."""
from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import httpx
import pytest

from daemon_helpers import REPO, env_for
from monitor_helpers import REQ, Monitor, free_port, make_home

TOKEN = "s3cret-token-for-tests-0123456789"


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path) -> None:
    home = make_home(tmp_path / "home")
    env = env_for(home.path)
    env.pop("TRAINER_MONITOR_TOKEN", None)
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        r = subprocess.run([sys.executable, "-m", "monitor", "--home", str(home.path), "--host", host,
                            "--port", str(free_port())], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode != 0
        assert f"refusing to listen on {host} without a token" in r.stderr
        assert "TRAINER_MONITOR_TOKEN" in r.stderr and "monitor.token" in r.stderr


@pytest.fixture(scope="module")
def mon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    home = make_home(tmp_path_factory.mktemp("tok") / "home")
    m = Monitor(home.path, host="0.0.0.0", env={"TRAINER_MONITOR_TOKEN": TOKEN}).start()
    yield m
    m.stop()


@pytest.mark.parametrize("path", ["/api/status", "/api/queue", "/api/metrics", "/api/gpu", "/api/memory",
                                  "/api/layers", "/api/logs", "/api/events", "/metrics", "/api/nothing"])
def test_every_api_call_needs_the_token(mon: Monitor, path: str) -> None:
    with httpx.Client(base_url=mon.base) as c:
        r = c.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        ok = 404 if path == "/api/nothing" else 200
        assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == ok
        assert c.get(path, headers={"X-Trainer-Token": TOKEN}).status_code == ok
        assert c.get(path, params={"token": TOKEN}).status_code == ok


def test_control_needs_token_in_a_header(mon: Monitor) -> None:
    with httpx.Client(base_url=mon.base) as c:
        assert c.post("/api/control/pause", headers=REQ).status_code == 401
        # ?token= is for GET only (EventSource); a change must carry it in a header
        assert c.post("/api/control/pause", params={"token": TOKEN}, headers=REQ).status_code == 401
        r = c.post("/api/control/pause", headers={**REQ, "Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 503                       # authorised; the daemon is not running
        # the token does not replace the CSRF header
        assert c.post("/api/control/pause", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403
        r = c.post("/api/queue", params={"name": "a.jsonl"}, content=b'{"text": "a"}\n',
                   headers={**REQ, "Content-Type": "application/x-ndjson"})
        assert r.status_code == 401
    assert list((mon.home / "inbox").iterdir()) == []


def test_page_and_health_need_no_token_but_stream_does(mon: Monitor) -> None:
    with httpx.Client(base_url=mon.base) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200             # static files hold no data
        assert c.get("/api/stream").status_code == 401
        with c.stream("GET", "/api/stream", params={"token": TOKEN}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("event:"):
                    assert line == "event: status"
                    break
