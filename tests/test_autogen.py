"""auto_generate: an empty queue gets fed; an unreachable generator is retried, never fatal."""
from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time

from daemon_helpers import alive, wait_for


def test_builtin_generator_fills_an_empty_queue(home):
    home.write_config(auto_generate={"enabled": True, "count": 5, "min_interval_s": 3600})
    home.launch()
    done = wait_for(lambda: [n for n in home.files("done") if n.startswith("autogen")], what="autogen trained")
    jobs = json.loads(home.ctl("queue", "list", "--json").stdout)
    assert jobs[0]["records"] == 5 and jobs[0]["format"] == "messages"
    time.sleep(2.0)           # several idle ticks: min_interval_s must hold back the next batch
    made = [p.name for p in home.path.rglob("autogen*.jsonl")]
    assert len(done) == 1 and len(made) == 1, made


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_logged_and_retried_then_recovers(home):
    port = _free_port()           # nothing listens here yet
    home.write_config(auto_generate={"enabled": True, "source": "http", "url": f"http://127.0.0.1:{port}/batch",
                                     "min_interval_s": 3600})
    home.launch()
    wait_for(lambda: "auto-generate (http) failed" in home.log_text(), what="failure logged")
    assert alive(home.pid())
    wait_for(lambda: "retrying in" in ((home.status().get("last_error") or {}).get("message") or ""),
             what="failure shown in status")

    body = b'{"text": "from the endpoint"}\n{"text": "second"}\n'

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:   # first retry after 5 s of backoff
        wait_for(lambda: [n for n in home.files("done") if n.startswith("autogen_http")], timeout=30,
                 what="endpoint batch trained")
    finally:
        srv.shutdown()


def test_command_source_output_is_validated_like_any_file(home):
    home.write_config(auto_generate={"enabled": True, "source": "command", "min_interval_s": 3600,
                                     "command": [sys.executable, "-c", "print('not json')"]})
    home.launch()
    failed = wait_for(lambda: home.files("failed"), what="bad batch rejected")
    assert "invalid JSON on line 1" in home.error(failed[0])["reason"]
    assert alive(home.pid())
