"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), against a real
monitor and a real daemon with the stand-in trainer. Screenshots go to test-artifacts/."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from daemon_helpers import REPO, text_records, wait_for, write_jsonl
from monitor_helpers import Monitor, make_home
from retention_helpers import write_matrix

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = REPO / "test-artifacts"
XSS_NAME = "<img src=x onerror=alert(1)>.jsonl"
XSS_SAFE = "img_src=x_onerror=alert_1.jsonl"
PANELS = ("status", "loss", "lr", "tps", "gpu", "memory", "layers", "queue", "events", "log-daemon",
          "log-training")

if not CHROMIUM.exists():
    pytest.skip("browser tests need Debian's Chromium at /usr/bin/chromium "
                "(apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="browser tests need the playwright package (pip install playwright)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    home = make_home(tmp_path_factory.mktemp("ui") / "home", standin_step_seconds=0.1)
    home.launch()
    inbox = home.path / "inbox"
    # hostile names and records: they must show as text and run nothing
    write_jsonl(inbox / XSS_NAME, [{"text": "<img src=x onerror=alert(1)>"},
                                   {"text": "<script>alert(2)</script>"}])
    (inbox / "<script>alert(3)<%2fscript>.jsonl").write_text('{"nope": "<img src=x onerror=alert(4)>"}\n')
    write_jsonl(inbox / "long.jsonl", text_records(3000, "ui"))
    wait_for(lambda: home.status().get("current_file") == "long.jsonl", timeout=20, what="long job")
    mon = Monitor(home.path).start()
    try:
        yield home, mon
    finally:
        mon.stop()
        home.kill_all()


class Page:
    """A page with its console errors and dialogs recorded."""

    def __init__(self, browser: Any, **ctx: Any) -> None:
        self.ctx = browser.new_context(**ctx)
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("dialog", self._dialog)

    def _dialog(self, d: Any) -> None:
        self.dialogs.append(d.message)
        d.dismiss()

    def panels(self) -> dict[str, tuple[str, str]]:
        return self.page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-panel]')]
            .map(p => [p.dataset.panel, [p.dataset.state,
                       ((p.querySelector(':scope > .reason') || p.querySelector('.reason') || {}).textContent || '').trim()]]))""")

    def wait_loaded(self, timeout: float = 10) -> dict[str, tuple[str, str]]:
        self.page.wait_for_function("""() => [...document.querySelectorAll('[data-panel]')]
            .every(p => p.dataset.state && p.dataset.state !== 'loading')""", timeout=timeout * 1000)
        return self.panels()

    def shot(self, name: str) -> Path:
        self.page.evaluate("() => window.scrollTo(0, 0)")
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.ctx.close()


def test_page_loads_and_every_panel_has_data_or_a_reason(browser, stack) -> None:
    home, mon = stack
    for scheme, size, name in (("light", {"width": 1280, "height": 900}, "dashboard_running_light.png"),
                               ("dark", {"width": 1280, "height": 900}, "dashboard_running_dark.png"),
                               ("light", {"width": 390, "height": 844}, "dashboard_running_phone.png")):
        pg = Page(browser, viewport=size, color_scheme=scheme)
        try:
            pg.page.goto(mon.base + "/")
            panels = pg.wait_loaded()
            assert set(PANELS) <= set(panels), panels
            for key, (state, reason) in panels.items():
                assert state in ("data", "reason"), (key, state)
                if state == "reason":
                    assert len(reason) > 10, (key, reason)
            assert panels["status"][0] == "data" and panels["queue"][0] == "data"
            assert panels["memory"][0] == "data" and panels["events"][0] == "data"
            assert panels["log-daemon"][0] == "data"
            assert "stand-in trainer" in panels["loss"][1] and "stand-in trainer" in panels["layers"][1]
            if panels["gpu"][0] == "reason":
                assert panels["gpu"][1].startswith("no NVIDIA GPU detected")
            p = pg.page
            p.wait_for_function("() => document.getElementById('state-badge').textContent === 'training'")
            assert p.text_content("#job-file") == "long.jsonl"
            assert "step " in p.text_content("#job-meta") and "ETA" in p.text_content("#job-meta")
            assert p.get_attribute("#conn", "data-conn") == "live"
            step0 = int(p.text_content("#job-meta").split()[1])
            p.wait_for_function(f"() => parseInt(document.getElementById('job-meta').textContent.split(' ')[1]) > {step0}",
                                timeout=3000)
            assert p.locator("#q-processing li[data-job='long.jsonl']").count() == 1
            assert p.locator("#chart-mem canvas").count() == 1
            time.sleep(0.3)
            pg.shot(name)
            assert pg.errors == [] and pg.dialogs == []
        finally:
            pg.close()


def test_pause_and_resume_buttons_drive_the_daemon(browser, stack) -> None:
    home, mon = stack
    pg = Page(browser, viewport={"width": 1280, "height": 900})
    try:
        p = pg.page
        p.goto(mon.base + "/")
        pg.wait_loaded()
        p.wait_for_function("() => !document.getElementById('btn-pause').disabled")
        p.click("#btn-pause")
        p.wait_for_function("() => document.getElementById('state-badge').textContent === 'paused'", timeout=5000)
        assert home.status()["status"] == "paused" and home.status()["paused"] is True
        step = home.status()["current_step"]
        time.sleep(0.5)
        assert home.status()["current_step"] == step, "the daemon really stopped stepping"
        assert p.is_disabled("#btn-pause") and p.is_enabled("#btn-resume")
        assert "pause" in p.text_content("#toasts").lower()
        # why it is paused (a user here; a full disk says "paused: disk full (N MiB free in DIR)")
        assert home.status()["paused_reason"] == "paused by user"
        p.wait_for_function("() => document.getElementById('state-detail').textContent"
                            ".includes('paused: paused by user')", timeout=5000)
        # no stale ETA or tokens/s while paused: the header says so
        p.wait_for_function("() => document.getElementById('job-meta').textContent.includes('paused')", timeout=5000)
        meta = p.text_content("#job-meta")
        assert "ETA" not in meta and "tok/s" not in meta, meta
        pg.shot("dashboard_paused.png")
        # stop asks first; cancelling leaves the daemon running
        p.click("#btn-stop")
        assert p.is_visible("#confirm-dialog")
        assert "Stop the daemon?" in p.text_content("#confirm-text")
        p.click("#confirm-cancel")
        assert not p.is_visible("#confirm-dialog")
        time.sleep(0.3)
        assert home.pid() and home.status()["status"] == "paused"
        p.click("#btn-resume")
        p.wait_for_function("() => document.getElementById('state-badge').textContent === 'training'", timeout=5000)
        assert home.status()["status"] == "training"
        assert pg.errors == [] and pg.dialogs == []
    finally:
        pg.close()


def test_hostile_names_and_records_show_as_text(browser, stack, tmp_path: Path) -> None:
    home, mon = stack
    pg = Page(browser, viewport={"width": 1280, "height": 900})
    try:
        p = pg.page
        p.goto(mon.base + "/#queue")
        pg.wait_loaded()
        # dropped straight into inbox/: the queue shows the sanitised name and the original as text
        p.wait_for_function(f"() => document.querySelector('#q-done li[data-job=\"{XSS_SAFE}\"]') !== null", timeout=5000)
        item = p.text_content(f"#q-done li[data-job='{XSS_SAFE}']")
        assert XSS_NAME in item
        assert XSS_NAME in p.text_content("#events")
        failed = p.text_content("#q-failed")
        assert "<script>alert(3)<%2fscript>.jsonl" in failed
        # uploaded through the page, with hostile records
        up = tmp_path / XSS_NAME
        write_jsonl(up, [{"text": "<script>alert(5)</script> <img src=x onerror=alert(6)>"}])
        p.set_input_files("#file-input", str(up))
        p.wait_for_function("() => document.querySelector('#upload-results li.ok') !== null", timeout=10000)
        assert p.text_content("#upload-results li.ok").startswith(XSS_NAME + ": ")
        # drag and drop onto the drop zone
        dt = p.evaluate_handle("""() => { const dt = new DataTransfer();
            dt.items.add(new File(['{"text": "<u>dropped</u>"}\\n'], 'dropped.jsonl', {type: 'application/x-ndjson'}));
            return dt; }""")
        p.dispatch_event("#dropzone", "drop", {"dataTransfer": dt})
        p.wait_for_function("() => [...document.querySelectorAll('#upload-results li.ok')]"
                            ".some(li => li.textContent.startsWith('dropped.jsonl: queued'))", timeout=10000)
        p.wait_for_function("() => document.querySelector('#q-pending li[data-job=\"dropped.jsonl\"], "
                            "#q-processing li[data-job=\"dropped.jsonl\"], #q-done li[data-job=\"dropped.jsonl\"]')"
                            " !== null", timeout=5000)
        p.wait_for_function("() => document.getElementById('log-daemon').textContent.includes('onerror')", timeout=5000)
        time.sleep(0.5)
        # nothing was parsed as HTML: no <img>, no inline <script>, no dialog
        counts = p.evaluate("""() => ({img: document.querySelectorAll('img, u').length,
                                       inline: document.querySelectorAll('script:not([src])').length,
                                       scripts: document.querySelectorAll('script').length})""")
        assert counts == {"img": 0, "inline": 0, "scripts": 2}, counts
        pg.shot("dashboard_hostile_names.png")
        assert pg.dialogs == [], pg.dialogs
        assert pg.errors == []
    finally:
        pg.close()


def test_polling_fallback_when_the_stream_fails(browser, stack) -> None:
    home, mon = stack
    pg = Page(browser, viewport={"width": 1000, "height": 800})
    try:
        p = pg.page
        p.route("**/api/stream*", lambda route: route.abort())      # e.g. a proxy that buffers SSE
        p.goto(mon.base + "/")
        p.wait_for_function("() => document.getElementById('conn').dataset.conn === 'polling'", timeout=10000)
        panels = pg.wait_loaded()
        assert panels["status"][0] == "data" and panels["queue"][0] == "data"
        assert p.text_content("#state-badge") == home.status()["status"]
        assert p.locator("#q-processing li[data-job='long.jsonl']").count() == 1
        assert pg.dialogs == []
    finally:
        pg.close()


IDLE_S = 600        # idle time between the two synthetic jobs


def _synthetic(home: Path, n: int = 300) -> None:
    """metrics.jsonl and layer_activity.json in the daemon's format (as the QLoRA trainer fills them)."""
    t0 = time.time() - n - IDLE_S
    lines = []
    for i in range(1, n + 1):        # two jobs, the second IDLE_S after the first
        job, t = (1, t0 + i) if i <= n // 2 else (2, t0 + IDLE_S + i)
        loss = 3.0 * math.exp(-i / 120) + 0.4
        lines.append(json.dumps({"time": t, "event": "step", "step": i, "total_steps": n, "loss": loss,
                                 "learning_rate": 2e-4 * (0.5 + 0.5 * math.cos(math.pi * i / n)),
                                 "tokens_per_second": 5000 + 200 * math.sin(i / 9), "grad_norm": 1 / (1 + i / 50),
                                 "job_id": job, "file": f"demo-{job}.jsonl"}))
        if i % 50 == 0:
            lines.append(json.dumps({"time": t, "event": "eval", "step": i, "eval_loss": loss + 0.1, "job_id": job,
                                     "file": f"demo-{job}.jsonl"}))
    (home / "status" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    mods = [{"module": f"layers.{layer}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}", "layer": layer, "type": t,
             "delta_norm": (layer + 1) * (k + 1) * 1e-3, "delta_change": (layer + 1) * (k + 1) * 1e-4,
             "grad_norm": 0.5 / (layer + 1)} for layer in range(6) for k, t in enumerate(types)]
    (home / "status" / "layer_activity.json").write_text(json.dumps(
        {"step": n, "job_id": 1, "updated_at": "2026-11-23T05:00:00+00:00", "modules": mods}))
    write_matrix(home, extra_jobs=6)      # the Retention panel: 8 adapters, wider than a phone


def test_charts_and_layer_heatmap_render(browser, tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", trainer="qlora")
    _synthetic(home.path)
    mon = Monitor(home.path).start()
    pg = Page(browser, viewport={"width": 1280, "height": 900})
    try:
        p = pg.page
        p.goto(mon.base + "/layer_activity_monitor.html")
        assert p.url.endswith("/#layers")
        panels = pg.wait_loaded()
        for key in ("loss", "lr", "tps", "layers", "memory"):
            assert panels[key][0] == "data", (key, panels[key])
        assert panels["status"][0] == "data"
        assert p.text_content("#state-badge") == "daemon not running"
        for chart in ("loss", "lr", "tps"):
            assert p.locator(f"#chart-{chart} canvas").count() == 1
        assert p.locator("#heatmap tbody tr").count() == 6
        assert p.locator("#heatmap tbody td").count() == 42
        assert p.locator("#movers li").count() == 10
        assert p.text_content("#movers li").startswith("layers.5.mlp.down_proj")
        p.select_option("#heat-metric", "grad_norm")
        assert p.text_content("#heatmap tbody tr:first-child td") == "0.5"
        # live: a new metrics line arrives over the stream
        with open(home.path / "status" / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"time": time.time(), "event": "step", "step": 301, "loss": 0.1, "job_id": 2,
                                 "file": "demo-2.jsonl"}) + "\n")
        p.wait_for_function("() => document.querySelector('#box-loss .u-legend') !== null")
        p.wait_for_function("() => window.trainerCharts['chart-loss'].u.data[1].at(-1) === 0.1")
        # the line breaks between the two jobs: a null between job 1's last and job 2's first point
        t = p.evaluate("() => window.trainerCharts['chart-loss'].u.data[0]")
        gaps = p.evaluate("() => window.trainerCharts['chart-loss'].u.data[1].flatMap((v, i) => v === null ? [i] : [])")
        assert len(gaps) == 1, gaps
        g = gaps[0]
        assert t[g + 1] - t[g - 1] > IDLE_S and t[g - 1] < t[g] < t[g + 1]
        # the legend shows the latest value without hovering; the job starts are marked
        p.wait_for_function("() => document.querySelectorAll('#box-loss .u-legend .u-series')[1]"
                            ".textContent.includes('0.1')", timeout=5000)   # 0.1: the new line's loss
        assert "latest" in p.locator("#box-loss .u-legend .u-series").nth(0).text_content()
        pg.shot("dashboard_charts_layers.png")
        assert pg.errors == [] and pg.dialogs == []
    finally:
        pg.close()
        mon.stop()


@pytest.mark.parametrize("width", [360, 390, 1440, 1920])
def test_no_horizontal_scroll_on_any_screen(browser, tmp_path: Path, width: int) -> None:
    home = make_home(tmp_path / "home", trainer="qlora")
    _synthetic(home.path)
    mon = Monitor(home.path).start()
    pg = Page(browser, viewport={"width": width, "height": 900})
    try:
        p = pg.page
        p.goto(mon.base + "/")
        panels = pg.wait_loaded()
        assert panels["layers"][0] == "data" and panels["loss"][0] == "data"
        assert panels["retention"][0] == "data"
        p.wait_for_function("() => document.querySelectorAll('#movers li').length === 10")
        time.sleep(0.3)
        sw, vw = p.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
        assert sw <= vw, f"the page is {sw} px wide at a {vw} px viewport"
        if width in (390, 1440):
            pg.shot(f"dashboard_{width}px.png")
        assert pg.errors == []
    finally:
        pg.close()
        mon.stop()


def test_a_held_job_is_marked(browser, tmp_path: Path) -> None:
    """The last job the promotion gate held back is marked "held", its reason shown as text."""
    home = make_home(tmp_path / "home")
    snap = "20260101_000000__x__held"
    reason = "held: forgot <img src=x onerror=alert(1)>.jsonl by 124 %"
    (home.path / "status" / "training_status.json").write_text(json.dumps({
        "status": "idle", "updated_at": "2026-01-01T00:00:00+00:00", "last_job": {
            "file": "reverse.jsonl", "job_id": 2, "outcome": "completed", "steps": 5, "reason": reason,
            "held": {"held": True, "summary": reason, "snapshot": f"/h/snapshots/{snap}"}}}))
    mon = Monitor(home.path).start()
    pg = Page(browser, viewport={"width": 1280, "height": 900})
    try:
        p = pg.page
        p.goto(mon.base + "/")
        pg.wait_loaded()
        p.wait_for_function("() => !document.getElementById('last-job').hidden")
        assert p.get_attribute("#last-job", "data-held") == "true"
        assert p.text_content("#last-job .held-badge") == "held"
        text = p.text_content("#last-job")
        assert reason in text and f"trainer-ctl promote {snap}" in text and "current_model/ unchanged" in text
        assert p.locator("#last-job img").count() == 0
        pg.shot("dashboard_held_job.png")
        assert pg.errors == [] and pg.dialogs == []
    finally:
        pg.close()
        mon.stop()


def test_token_from_the_address_bar(browser, tmp_path: Path) -> None:
    token = "browser-token-0123456789abcdef"
    home = make_home(tmp_path / "home")
    mon = Monitor(home.path, env={"TRAINER_MONITOR_TOKEN": token}).start()
    pg = Page(browser, viewport={"width": 1000, "height": 800})
    try:
        p = pg.page
        p.goto(mon.base + f"/?token={token}#queue")
        panels = pg.wait_loaded()
        assert "token" not in p.url and p.url.endswith("/#queue")
        assert p.evaluate("() => sessionStorage.getItem('trainerMonitorToken')") == token
        assert panels["status"][0] == "data" and p.get_attribute("#conn", "data-conn") == "live"
        p.reload()                                           # kept for the session
        pg.wait_loaded()
        assert p.text_content("#state-badge") == "daemon not running"
        assert pg.errors == []
    finally:
        pg.close()
        mon.stop()


@pytest.mark.slow
def test_every_panel_has_data_during_a_real_tiny_training_run(browser, tmp_path: Path) -> None:
    """The real QLoRA worker on the tiny base: loss, lr, tokens/s and layer activity all live."""
    from daemon.generator import generate_records
    from trainer.tiny_base import build_tiny_base

    base = build_tiny_base(tmp_path / "tiny-base")
    home = make_home(tmp_path / "home", trainer="qlora", base_model=str(base), max_length=128,
                     batch_size=2, learning_rate=3e-3, lr_scheduler="constant", eval_fraction=0.05,
                     layer_activity_every_steps=3, checkpoint_every_steps=50, probe_prompts=["What is 2 + 3?"])
    write_jsonl(home.path / "inbox/arith.jsonl", generate_records(3000, seed=7))
    home.launch()
    mon = Monitor(home.path).start()
    pg = Page(browser, viewport={"width": 1280, "height": 900})
    try:
        wait_for(lambda: (home.status().get("current_step") or 0) >= 6, timeout=180, what="training steps")
        pg.page.goto(mon.base + "/")
        pg.wait_loaded()
        pg.page.wait_for_function("""() => ['loss', 'lr', 'tps', 'layers'].every(k =>
            document.querySelector(`[data-panel="${k}"]`).dataset.state === 'data')""", timeout=30000)
        panels = pg.panels()
        for key, (state, reason) in panels.items():
            if key == "gpu" and state == "reason":
                assert reason.startswith("no NVIDIA GPU detected")
                continue
            if key == "retention" and state == "reason":     # filled by the first job's evaluation, at its end
                assert reason.startswith("no retention evaluations yet"), reason
                continue
            assert state == "data", (key, reason)
        assert pg.page.locator("#chart-loss canvas").count() == 1
        time.sleep(1.0)
        pg.shot("dashboard_real_training.png")
        assert pg.errors == [] and pg.dialogs == []
    finally:
        pg.close()
        mon.stop()
        home.kill_all()


def _no_horizontal_scroll(p: Any) -> None:
    sw, vw = p.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
    assert sw <= vw, f"the page is {sw} px wide at a {vw} px viewport"


def test_samples_mark_the_newest_change_and_show_hostile_text_as_text(browser, tmp_path: Path) -> None:
    """The Samples panel (GET /api/samples): per prompt its answers oldest first, the words the newest
    changed marked, the reference shown; prompts and answers are text. A new round shows up live."""
    from core.statedb import StateDB
    from test_monitor_samples import HOSTILE, probe_round

    home = make_home(tmp_path / "home", trainer="qlora")
    db = StateDB(home.path / "status" / "state.db")
    long_word = "x" * 300                       # one unbreakable word: wrapped, never a page-wide scroll
    probe_round(db, 1, "base", 0, {"What is 2 + 3?": "", HOSTILE: "<b>base</b> says " + long_word}, "add.jsonl")
    probe_round(db, 1, "step", 4, {"What is 2 + 3?": "the answer is four", HOSTILE: "<script>alert(2)</script>"},
                "add.jsonl")
    probe_round(db, 1, "end", 8, {"What is 2 + 3?": "the answer is 5", HOSTILE: HOSTILE}, "add.jsonl")
    mon = Monitor(home.path).start()
    try:
        for width in (1440, 390):
            pg = Page(browser, viewport={"width": width, "height": 900})
            try:
                p = pg.page
                p.goto(mon.base + "/#samples")
                panels = pg.wait_loaded()
                assert panels["samples"][0] == "data", panels["samples"]
                cards = p.locator("#samples-list > li.sample")
                assert cards.count() == 2
                first, second = cards.nth(0), cards.nth(1)
                assert first.locator(".sample-prompt").text_content() == "What is 2 + 3?"
                assert [x.get_attribute("data-phase") for x in first.locator("ol.answers > li").all()] == ["base", "step", "end"]
                assert "empty" in first.locator("ol.answers > li").nth(0).text_content()
                newest = first.locator("li.newest")
                assert newest.locator(".answer").text_content() == "the answer is 5"
                assert [m.text_content() for m in newest.locator("mark").all()] == ["5"]     # "four" -> "5"
                assert "after the job (step 8) · add.jsonl" in newest.locator(".answer-meta").text_content()
                # hostile prompt, answers and reference: text, nothing run, no element made from them
                assert second.locator(".sample-prompt").text_content() == HOSTILE
                assert second.locator(".sample-source").text_content() == "retention set of add.jsonl"
                assert second.locator(".sample-ref").text_content() == "reference: 5"
                assert second.locator("li.newest .answer").text_content() == HOSTILE
                assert p.locator("#samples img, #samples script, #samples b:not(.sample-ref b)").count() == 0
                assert p.locator("#samples-list").text_content().count("<script>alert(2)</script>") == 1
                time.sleep(0.3)
                _no_horizontal_scroll(p)
                pg.shot(f"samples_{width}px.png")
                if width == 390:            # a new round: the daemon's probe event, the panel reloads
                    db.add_event("probe", "probe answers at end of step 12: 2 prompt(s) in 0.2 s", job_id=2)
                    probe_round(db, 2, "end", 12, {"What is 2 + 3?": "it is 5 now", HOSTILE: HOSTILE}, "b.jsonl")
                    db.add_event("probe", "probe answers at end of step 12: 2 prompt(s) in 0.2 s", job_id=2)
                    p.wait_for_function("() => document.querySelector('#samples-list li.sample li.newest .answer')"
                                        ".textContent === 'it is 5 now'", timeout=10000)
                    assert [m.text_content() for m in first.locator("li.newest mark").all()] == ["it", "now"]
                assert pg.errors == [] and pg.dialogs == []
            finally:
                pg.close()
    finally:
        db.close()
        mon.stop()


@pytest.mark.slow
def test_samples_show_base_and_post_job_answers_during_a_real_tiny_run(browser, tmp_path: Path) -> None:
    """The real QLoRA worker on the tiny base: the configured prompts' base answers while the job
    trains, then the adapter's answer after it; a hostile prompt shows as text."""
    from daemon.generator import generate_records
    from trainer.tiny_base import build_tiny_base

    hostile = "<img src=x onerror=alert(1)> What is 2 + 3?"
    base = build_tiny_base(tmp_path / "tiny-base")
    home = make_home(tmp_path / "home", trainer="qlora", base_model=str(base), max_length=96, batch_size=2,
                     learning_rate=5e-3, lr_scheduler="constant", eval_fraction=0.05, checkpoint_every_steps=50,
                     probe_prompts=["What is 2 + 3?", hostile], probe_every_steps=10, probe_max_new_tokens=16)
    home.launch()
    mon = Monitor(home.path).start()
    pg = Page(browser, viewport={"width": 1440, "height": 900})
    try:
        p = pg.page
        p.goto(mon.base + "/#samples")
        panels = pg.wait_loaded()
        assert panels["samples"][0] == "reason" and "no samples yet" in panels["samples"][1]
        write_jsonl(home.path / "inbox/arith.jsonl", generate_records(160, seed=7))
        card = "#samples-list > li.sample"
        p.wait_for_function(f"() => document.querySelectorAll('{card} li[data-phase=base]').length === 2", timeout=180000)
        assert home.status().get("current_file") == "arith.jsonl"        # during the run
        assert p.locator(f"{card} li[data-phase=end]").count() == 0
        first = p.locator(card).nth(0)
        assert first.locator(".sample-prompt").text_content() == "What is 2 + 3?"
        assert "base model · arith.jsonl" in first.locator("li[data-phase=base] .answer-meta").text_content()
        pg.shot("samples_real_run_base.png")
        p.wait_for_function(f"() => document.querySelectorAll('{card} li[data-phase=end]').length >= 2", timeout=300000)
        wait_for(lambda: home.files("done") == ["arith.jsonl"], timeout=60, what="the job done")
        phases = [x.get_attribute("data-phase") for x in first.locator("ol.answers > li").all()]
        assert phases[0] == "base" and phases[-1] == "end" and "step" in phases, phases
        assert "after the job" in first.locator("li.newest .answer-meta").text_content()
        assert p.locator(card).nth(1).locator(".sample-prompt").text_content() == hostile
        assert p.locator("#samples img").count() == 0
        # the retention set's prompts, with their reference answers, join after the job
        p.wait_for_function(f"() => document.querySelectorAll('{card} .sample-ref').length === 2", timeout=20000)
        time.sleep(0.5)
        pg.shot("samples_real_run_1440px.png")
        p.set_viewport_size({"width": 390, "height": 844})
        time.sleep(0.5)
        _no_horizontal_scroll(p)
        pg.shot("samples_real_run_390px.png")
        assert pg.errors == [] and pg.dialogs == []
    finally:
        pg.close()
        mon.stop()
        home.kill_all()
