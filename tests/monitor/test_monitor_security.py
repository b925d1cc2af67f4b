"""Security rules of the monitor, against a real uvicorn subprocess (loopback, no token).

Host allowlist (DNS rebinding), CSRF (custom header, Origin/Referer, content types, every mutating
method), no CORS, path traversal on queue routes and static files, and the upload size cap.
"""
from __future__ import annotations

import http.client
import json
import time
from typing import Iterator

import httpx
import pytest

from core.paths import Layout
from core.statedb import StateDB
from core.states import JobState
from monitor_helpers import REQ, Monitor, make_home

LIMIT = 1000


@pytest.fixture(scope="module")
def mon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    home = make_home(tmp_path_factory.mktemp("sec") / "home",
                     monitor={"allowed_hosts": ["trainer.lan"], "max_upload_bytes": LIMIT})
    layout = Layout(home.path)
    # a queue with one real pending job: the one a traversal would like to reach around
    db = StateDB(layout.state_db)
    db.insert_job(name="victim.jsonl", original_name="victim.jsonl", state=JobState.PENDING,
                  sha256="0" * 64, size=10, records=1)
    db.close()
    (layout.state_dir(JobState.PENDING) / "victim.jsonl").write_text('{"text": "x"}\n')
    m = Monitor(home.path).start()
    yield m
    m.stop()


def raw(mon: Monitor, method: str, path: str, headers: dict[str, str | None] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path and Host exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", mon.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        hdrs: dict[str, str | None] = {"Host": f"127.0.0.1:{mon.port}", **(headers or {})}
        for k, v in hdrs.items():
            if v is not None:
                conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def inbox(mon: Monitor) -> list[str]:
    return sorted(p.name for p in (mon.home / "inbox").iterdir())


def control_files(mon: Monitor) -> list[str]:
    return sorted(p.name for p in (mon.home / "control").iterdir() if p.is_file())


# ---- Host header -----------------------------------------------------------------------------
@pytest.mark.parametrize("host,ok", [
    ("localhost:8080", True), ("127.0.0.1", True), ("[::1]:9999", True), ("LOCALHOST", True),
    ("trainer.lan:8080", True),
    ("evil.example", False), ("evil.example:8080", False), ("127.0.0.1.evil.example", False),
    ("localhost.evil.example", False), ("192.168.1.10:8080", False), ("[::2]", False),
])
def test_host_allowlist(mon: Monitor, host: str, ok: bool) -> None:
    status, _, body = raw(mon, "GET", "/api/status", {"Host": host})
    if ok:
        assert status == 200, body
    else:
        assert status == 421 and b"not allowed" in body
    status, _, _ = raw(mon, "GET", "/", {"Host": host})
    assert (status == 200) == ok


def test_bad_or_missing_host(mon: Monitor) -> None:
    assert raw(mon, "GET", "/api/status", {"Host": "a b"})[0] == 400
    assert raw(mon, "GET", "/api/status", {"Host": "user@localhost"})[0] == 400
    assert raw(mon, "GET", "/api/status", {"Host": None})[0] == 400


def test_rebinding_post_refused_even_with_the_header(mon: Monitor) -> None:
    status, _, _ = raw(mon, "POST", "/api/control/pause", {"Host": "evil.example:8080", **REQ})
    assert status == 421


# ---- CSRF --------------------------------------------------------------------------------------
MUTATIONS = [("POST", "/api/control/pause"), ("POST", "/api/control/stop"),
             ("POST", "/api/queue/victim.jsonl/priority"), ("POST", "/api/queue/victim.jsonl/retry"),
             ("DELETE", "/api/queue/victim.jsonl"), ("POST", "/api/queue?name=x.jsonl"),
             ("PUT", "/index.html")]
WRONG_METHODS = [("PUT", "/api/queue/victim.jsonl", "DELETE, GET, HEAD"),
                 ("PATCH", "/api/queue/victim.jsonl", "DELETE, GET, HEAD"),
                 ("DELETE", "/api/status", "GET, HEAD")]


@pytest.mark.parametrize("method,path", MUTATIONS)
def test_mutation_without_custom_header_is_403(mon: Monitor, method: str, path: str) -> None:
    status, headers, body = raw(mon, method, path, {"Content-Type": "application/json"}, b'{"level": "low"}')
    assert status == 403 and b"X-Trainer-Request" in body
    assert not any(k.startswith("access-control-") for k in headers)


@pytest.mark.parametrize("method,path,allow", WRONG_METHODS)
def test_a_method_the_route_lacks_is_405_before_anything_else(mon: Monitor, method: str, path: str,
                                                              allow: str) -> None:
    status, headers, body = raw(mon, method, path, {"Content-Type": "application/json"}, b'{"level": "low"}')
    assert status == 405 and headers["allow"] == allow and b"not allowed" in body
    assert not any(k.startswith("access-control-") for k in headers)


@pytest.mark.parametrize("method,path", MUTATIONS[:6])
@pytest.mark.parametrize("hdrs", [
    {"Origin": "http://evil.example"}, {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},                       # same host, other port = other origin
    {"Origin": "https://localhost.evil.example"},
    {"Referer": "http://evil.example/page"},
])
def test_foreign_origin_or_referer_is_403(mon: Monitor, method: str, path: str, hdrs: dict[str, str]) -> None:
    status, _, body = raw(mon, method, path, {**REQ, "Content-Type": "application/json", **hdrs}, b"{}")
    assert status == 403 and (b"Origin" in body or b"Referer" in body)


@pytest.mark.parametrize("ctype", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("method,path", MUTATIONS[:6])
def test_simple_content_types_are_rejected(mon: Monitor, method: str, path: str, ctype: str) -> None:
    status, _, _ = raw(mon, method, path, {**REQ, "Content-Type": ctype}, b'{"level": "low"}')
    assert status == 415


def test_same_origin_request_passes_the_checks(mon: Monitor) -> None:
    origin = f"http://127.0.0.1:{mon.port}"
    status, _, body = raw(mon, "POST", "/api/control/pause", {**REQ, "Origin": origin})
    assert status == 503 and b"daemon not running" in body          # past security, daemon is down
    status, _, _ = raw(mon, "POST", "/api/control/pause", {**REQ, "Referer": origin + "/"})
    assert status == 503


def test_other_methods_and_no_cors(mon: Monitor) -> None:
    status, headers, _ = raw(mon, "OPTIONS", "/api/control/pause", {
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-trainer-request"})
    assert status == 405 and not any(k.startswith("access-control-") for k in headers)
    for method in ("TRACE", "CONNECT", "PROPFIND", "FOO"):
        assert raw(mon, method, "/api/status")[0] in (400, 405)
    status, headers, _ = raw(mon, "GET", "/api/status", {"Origin": "http://evil.example"})
    assert status == 200 and not any(k.startswith("access-control-") for k in headers)
    assert headers["x-content-type-options"] == "nosniff" and "frame-ancestors 'none'" in headers[
        "content-security-policy"]
    assert "server" not in headers


def test_head_is_answered_wherever_get_is(mon: Monitor) -> None:
    for path in ("/metrics", "/healthz", "/api/status", "/api/queue", "/openapi.json", "/"):
        g_status, g_headers, g_body = raw(mon, "GET", path)
        status, headers, body = raw(mon, "HEAD", path)
        assert status == g_status == 200 and body == b"", (path, status)
        assert headers["content-type"] == g_headers["content-type"], path
    t0 = time.monotonic()
    status, headers, body = raw(mon, "HEAD", "/api/stream")        # a stream: headers, then the end
    assert status == 200 and body == b"" and "text/event-stream" in headers["content-type"]
    assert time.monotonic() - t0 < 5
    assert raw(mon, "HEAD", "/api/nothing-here")[0] == 404


def test_a_wrong_method_is_405_with_the_route_s_own_allow(mon: Monitor) -> None:
    status, headers, _ = raw(mon, "PUT", "/api/status", REQ)
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, _ = raw(mon, "OPTIONS", "/api/control/pause")
    assert status == 405 and headers["allow"] == "POST"
    status, headers, _ = raw(mon, "DELETE", "/metrics")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert raw(mon, "PUT", "/api/no-such-route", REQ)[0] == 404      # no route: no Allow to give


def test_control_body_is_capped(mon: Monitor) -> None:
    big = json.dumps({"level": "low", "pad": "x" * 100_000}).encode()
    status, _, _ = raw(mon, "POST", "/api/queue/victim.jsonl/priority",
                       {**REQ, "Content-Type": "application/json"}, big)
    assert status == 413


def test_a_chunked_body_is_capped_also_where_the_route_reads_none(mon: Monitor) -> None:
    """No Content-Length (chunked): the limit still holds, also for a route that ignores its body."""
    def chunks(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield b"x" * 1024
    with httpx.Client(base_url=mon.base, timeout=15) as c:
        r = c.post("/api/control/pause", content=chunks(100), headers={**REQ, "Content-Type": "application/json"})
        assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]
        r = c.post("/api/control/pause", content=chunks(1), headers={**REQ, "Content-Type": "application/json"})
        assert r.status_code == 503, r.text          # small: through to the route (daemon is down)


# ---- path traversal --------------------------------------------------------------------------
TRAVERSALS = ["../victim.jsonl", "..%2fvictim.jsonl", "%2e%2e%2fvictim.jsonl", "%2E%2E%2Fvictim.jsonl",
              "%252e%252e%252fvictim.jsonl", "..%252fconfig.json", "%2fetc%2fpasswd", "/etc/passwd",
              "..%5cvictim.jsonl", "..", "%2e%2e", ".victim.jsonl", "config.json", "..%00victim.jsonl",
              "victim.jsonl%00", "pending%2fvictim.jsonl", "queue%2fpending%2fvictim.jsonl"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_queue_routes_never_take_a_path(mon: Monitor, name: str) -> None:
    hdrs = {**REQ, "Content-Type": "application/json"}
    for method, path, body in (("POST", f"/api/queue/{name}/retry", b"{}"),
                               ("POST", f"/api/queue/{name}/priority", b'{"level": "high"}'),
                               ("DELETE", f"/api/queue/{name}", None)):
        status, _, resp = raw(mon, method, path, hdrs, body)
        assert status == 404, (method, path, status, resp)
    assert control_files(mon) == [], "no control request may have been written"
    assert (mon.home / "queue/pending/victim.jsonl").exists()
    # the real name is found, and only then is the queue changed (the daemon is down here: the
    # monitor applies it itself under the daemon lock, as trainer-ctl does)
    status, _, resp = raw(mon, "POST", "/api/queue/victim.jsonl/priority", hdrs, b'{"level": "high"}')
    assert status == 200 and b"priority is now high" in resp, resp
    assert control_files(mon) == []


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST"])
def test_an_encoded_slash_in_a_name_is_part_of_the_name(mon: Monitor, method: str) -> None:
    """``x%2Fretry`` is a (missing) job's name, never the URL of another route (which would be 405)."""
    for name in ("x%2Fretry", "x%2fpriority", "victim.jsonl%2Fretry"):
        status, _, resp = raw(mon, method, f"/api/queue/{name}",
                              {**REQ, "Content-Type": "application/json"}, b"{}" if method == "POST" else None)
        assert status == (405 if method == "POST" else 404), (method, name, status, resp)
    assert control_files(mon) == []


STATIC_TRAVERSALS = ["/../pyproject.toml", "/..%2fpyproject.toml", "/%2e%2e/pyproject.toml",
                     "/%2e%2e%2fpyproject.toml", "/%252e%252e%252fpyproject.toml",
                     "/vendor/../../pyproject.toml", "/vendor/..%2f..%2fpyproject.toml",
                     "/vendor/%2e%2e/%2e%2e/pyproject.toml", "//etc/passwd", "/%2fetc%2fpasswd",
                     "/..%5cpyproject.toml", "/index.html/../../pyproject.toml",
                     "/../monitor/app.py", "/%2e%2e/core/config.py", "/vendor/", "/vendor",
                     "/.git/config", "/../config.json"]


@pytest.mark.parametrize("path", STATIC_TRAVERSALS)
def test_static_files_only_from_web(mon: Monitor, path: str) -> None:
    status, _, body = raw(mon, "GET", path)
    assert status in (400, 404), (path, status)
    assert b"[project]" not in body and b"root:" not in body and b"import" not in body


def test_static_and_legacy_urls(mon: Monitor) -> None:
    status, headers, body = raw(mon, "GET", "/")
    assert status == 200 and b"<title>Trainer monitor</title>" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    for path in ("/app.js", "/style.css", "/vendor/uplot/uPlot.iife.min.js", "/vendor/uplot/LICENSE"):
        assert raw(mon, "GET", path)[0] == 200, path
    status, headers, _ = raw(mon, "GET", "/live_monitor_ui_v2.html")
    assert status == 301 and headers["location"] == "/"
    status, headers, _ = raw(mon, "GET", "/layer_activity_monitor.html")
    assert status == 301 and headers["location"] == "/#layers"


# ---- uploads -----------------------------------------------------------------------------------
def post_upload(mon: Monitor, **kw) -> httpx.Response:
    with httpx.Client(base_url=mon.base, timeout=15) as c:
        return c.post("/api/queue", **kw)


def test_upload_over_the_limit_is_413_and_writes_nothing(mon: Monitor) -> None:
    big = b'{"text": "' + b"x" * (LIMIT * 3) + b'"}\n'
    # announced size
    r = post_upload(mon, params={"name": "big.jsonl"}, content=big,
                    headers={**REQ, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 413
    # chunked: no Content-Length, counted as it arrives
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 256):
            yield big[i:i + 256]
    r = post_upload(mon, params={"name": "big.jsonl"}, content=chunks(),
                    headers={**REQ, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 413
    # multipart
    r = post_upload(mon, files={"file": ("big.jsonl", big, "application/octet-stream")}, headers=REQ)
    assert r.status_code == 413
    assert inbox(mon) == [], "nothing may be left in inbox/"


def test_upload_rules_with_daemon_down(mon: Monitor) -> None:
    small = b'{"text": "<script>alert(1)</script>"}\n'
    hdr = {**REQ, "Content-Type": "application/x-ndjson"}
    assert post_upload(mon, params={"name": "a.jsonl"}, content=small,
                       headers={**REQ, "Content-Type": "text/plain"}).status_code == 415
    assert post_upload(mon, params={"name": "a.jsonl"}, content=small, headers=REQ).status_code == 415
    assert post_upload(mon, params={"name": "a.jsonl"}, content=b"", headers=hdr).status_code == 400
    assert inbox(mon) == []
    # no daemon runs: the monitor queues the file itself (daemon/queueops.py, as trainer-ctl does)
    r = post_upload(mon, content=small, headers=hdr)                 # no name: a default one
    assert r.status_code == 201 and r.json()["name"] == "upload.jsonl", r.text
    assert (mon.home / "queue/pending/upload.jsonl").read_bytes() == small
    names = {"../../escape.jsonl": "escape.jsonl", "/etc/passwd": "passwd.jsonl",
             "<img src=x onerror=alert(1)>.jsonl": "img_src=x_onerror=alert_1.jsonl",
             "..": "dataset.jsonl"}
    bodies = {}
    for given, expected in names.items():
        bodies[expected] = small + json.dumps({"text": given}).encode() + b"\n"     # not a duplicate
        r = post_upload(mon, params={"name": given}, content=bodies[expected], headers=hdr)
        assert r.status_code == 201 and r.json()["name"] == expected, r.text
    assert inbox(mon) == []
    pending = {p.name for p in (mon.home / "queue/pending").iterdir()}
    assert pending >= {*names.values(), "upload.jsonl"}, pending
    assert not (mon.home.parent / "escape.jsonl").exists()
    assert not list(mon.home.parent.parent.glob("escape.jsonl"))
    for n in names.values():
        assert (mon.home / "queue/pending" / n).read_bytes() == bodies[n]


def test_metrics_endpoint_tolerates_torn_line(mon: Monitor) -> None:
    path = mon.home / "status" / "metrics.jsonl"
    path.write_text('{"time": 1, "step": 1, "loss": 2.0, "job_id": 1}\n'
                    'not json\n'
                    '{"time": 2, "step": 2, "loss": 1.5, "job_id": 1}\n'
                    '{"time": 3, "step": 3, "lo')
    with httpx.Client(base_url=mon.base) as c:
        m = c.get("/api/metrics").json()
        assert [r["step"] for r in m["records"]] == [1, 2]
        with open(path, "a") as fh:
            fh.write('ss": 1.2, "job_id": 1}\n')
        m = c.get("/api/metrics", params={"since_seq": m["next_seq"]}).json()
        assert [(r["step"], r["loss"]) for r in m["records"]] == [(3, 1.2)]
    path.unlink()
