"""A job's data report in the API (GET /api/queue, GET /api/queue/{name}) and on the dashboard (a
real monitor on a free port, a real headless Chromium): the compact totals line, one line per
reason with its line numbers, and hostile reason names shown as text."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from core.paths import Layout
from core.statedb import StateDB
from core.states import JobState
from monitor_helpers import Monitor, make_home

XSS = "<img src=x onerror=alert(1)>"
NEW = {"format": "messages", "truncation": "keep_answer", "max_length": 512,
       "records": 1000, "examples": 1010, "tokens": 491000, "trained_tokens": 250000, "tokens_cut": 1234,
       "reasons": {"truncated": {"count": 12, "lines": [4, 9], "tokens_cut": 1234},
                   "dropped": {"count": 1, "lines": [77]},
                   "no_user_turn": {"count": 2, "lines": [5, 6]},
                   XSS: {"count": 3, "lines": [10, 11, 12], "message": "<script>alert(2)</script>"}}}
FLAT = {"format": "text", "records": 3, "examples": 3, "truncated": 1, "dropped_too_long": 0,
        "dropped_empty": 0, "tokens": 42, "trained_tokens": 30, "skipped_invalid": 2}


def _jobs(home: Path) -> None:
    """Three jobs as the daemon leaves them: two trained with a report (new and older shape), one
    waiting (no report yet). The report is written the way Daemon._on_event writes it."""
    db = StateDB(Layout(home).state_db)
    try:
        for name, state, report in (("new.jsonl", JobState.DONE, NEW), ("flat.jsonl", JobState.DONE, FLAT),
                                    ("waiting.jsonl", JobState.PENDING, None)):
            job = db.insert_job(name=name, original_name=name, state=state, sha256=name * 2, size=100,
                                fmt="messages", records=1000)
            if report is not None:
                db.update(job.id, attempts=1, steps=10, finished_at=time.time())
                assert db.set_data_report(job.id, report)
    finally:
        db.close()


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    home = make_home(tmp_path_factory.mktemp("report") / "home")
    _jobs(home.path)
    mon = Monitor(home.path).start()
    try:
        yield mon
    finally:
        mon.stop()


def test_the_queue_api_includes_the_data_report(monitor: Monitor) -> None:
    with monitor.client() as c:
        q = c.get("/api/queue").json()
        done = {j["name"]: j for j in q["jobs"]["done"]}
        assert done["new.jsonl"]["data_report"] == NEW
        assert done["flat.jsonl"]["data_report"]["reasons"] == {"truncated": {"count": 1},
                                                                "skipped_invalid": {"count": 2}}
        assert q["jobs"]["pending"][0]["data_report"] is None
        one = c.get("/api/queue/new.jsonl")
        assert one.status_code == 200 and one.json()["data_report"] == NEW and one.json()["validation"] is None
        assert c.get("/api/queue/nope.jsonl").status_code == 404
        assert c.get("/api/queue/..%2fstatus%2fstate.db").status_code == 404


# ---- the dashboard in Chromium -------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="browser tests need the playwright package (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_the_dashboard_shows_the_report_reasons_and_lines_as_text(browser: Any, monitor: Monitor) -> None:
    from daemon_helpers import REPO
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(monitor.base + "/#queue")
        page.wait_for_function("() => document.querySelector('#q-done li[data-job=\"new.jsonl\"] .data-report') !== null",
                               timeout=10000)
        item = "#q-done li[data-job='new.jsonl']"
        summary = page.text_content(f"{item} .dr-summary")
        assert summary.replace("\u202f", " ") == "1,000 records → 1,010 examples, 491k tokens (250k trained)"
        reasons = page.eval_on_selector_all(f"{item} .dr-reasons li", "els => els.map(e => e.textContent)")
        assert reasons == ["truncated: 12 records (1,234 tokens cut), lines 4, 9, …",
                           "dropped: 1 record, line 77",
                           "no_user_turn: 2 records, lines 5, 6",
                           f"{XSS}: 3 records, lines 10, 11, 12 — <script>alert(2)</script>"], reasons
        assert "format messages, truncation keep_answer, max length 512" in page.get_attribute(
            f"{item} .data-report", "title")
        # the older flat shape: its counters are the reasons
        flat = page.eval_on_selector_all("#q-done li[data-job='flat.jsonl'] .dr-reasons li",
                                         "els => els.map(e => e.textContent)")
        assert flat == ["truncated: 1 record", "skipped_invalid: 2 records"], flat
        assert page.text_content("#q-done li[data-job='flat.jsonl'] .dr-summary") == \
            "3 records → 3 examples, 42 tokens (30 trained)"
        # no report yet: nothing shown for it
        assert page.locator("#q-pending li[data-job='waiting.jsonl'] .data-report").count() == 0
        # nothing from the report was parsed as HTML
        time.sleep(0.3)
        counts = page.evaluate("""() => ({img: document.querySelectorAll('img').length,
                                          inline: document.querySelectorAll('script:not([src])').length})""")
        assert counts == {"img": 0, "inline": 0}, counts
        (REPO / "test-artifacts").mkdir(exist_ok=True)
        page.locator("#queue").screenshot(path=str(REPO / "test-artifacts" / "dashboard_data_report.png"))
        assert dialogs == [] and errors == [], (dialogs, errors)
    finally:
        ctx.close()
