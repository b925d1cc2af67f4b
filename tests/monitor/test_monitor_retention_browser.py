"""The Retention panel (the forgetting matrix as a heatmap) in a real headless Chromium: synthetic
state.db data first (fast), then during a real tiny training run of two jobs through the daemon
with the promotion gate on. Screenshots go to test-artifacts/."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from core import evaltable
from core.paths import Layout
from core.statedb import StateDB
from daemon_helpers import Home, reverse_records, wait_for, write_jsonl
from monitor_helpers import Monitor, make_home, stop_daemon
from retention_helpers import HELD_REASON, HELD_SNAPSHOT, XSS_DATASET, row, write_matrix
from test_monitor_browser import ARGS, ARTIFACTS, CHROMIUM, Page, sync_api

ROWS = "#retention-table tbody tr"
HEADS = "#retention-table thead th[data-job]"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def _table(p: Any) -> dict[str, Any]:
    """What the panel shows: row labels, column labels, cell texts and marks, as the page has them."""
    return p.evaluate("""() => {
        const t = document.getElementById('retention-table');
        return {
          rows: [...t.querySelectorAll('tbody th')].map(th => th.textContent),
          cols: [...t.querySelectorAll('thead th[data-job]')].map(th => th.dataset.job),
          held: [...t.querySelectorAll('thead th.held')].map(th => th.dataset.job),
          marks: Object.fromEntries([...t.querySelectorAll('thead th[data-job]')].map(th =>
            [th.dataset.job, [...th.querySelectorAll('.mark')].map(m => [m.textContent, m.title])])),
          cells: [...t.querySelectorAll('tbody tr')].map(tr => [...tr.querySelectorAll('td')].map(td =>
            [td.textContent, td.dataset.change || null, td.title])),
          state: document.getElementById('retention').dataset.state,
        };
    }""")


def _shot(p: Any, name: str) -> None:
    """The panel alone, from a full-page render (the sticky header stays at the top, off the panel)."""
    p.evaluate("() => window.scrollTo(0, 0)")
    box = p.evaluate("""() => { const r = document.getElementById('retention').getBoundingClientRect();
        return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; }""")
    p.screenshot(path=str(ARTIFACTS / name), full_page=True, clip=box)


def _wait_columns(p: Any, n: int, timeout: float = 10, home: Home | None = None,
                  mon: Monitor | None = None) -> None:
    """Until the heatmap has *n* columns; on a timeout, what the daemon, the monitor and the API say."""
    try:
        p.wait_for_function(f"() => document.querySelectorAll('{HEADS}').length === {n}", timeout=timeout * 1000)
    except sync_api.TimeoutError:
        why = [f"the page shows {_table(p)}"]
        if mon is not None:
            why.append(f"/api/eval: {httpx.get(mon.base + '/api/eval', timeout=10).text[:3000]}")
            why.append(f"monitor output: {mon.output()[-3000:]}")
        if home is not None:
            why.append(f"trainer-ctl status: {home.ctl('status').stdout}")
            logs = sorted((home.path / "logs").glob("*.log"))
            why += [f"{log.name}: {log.read_text(errors='replace')[-4000:]}" for log in logs]
        raise AssertionError(f"no {n} columns in {timeout} s\n" + "\n\n".join(why)) from None


def test_heatmap_rows_held_column_and_hostile_names(browser, tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    mon = Monitor(home.path).start()
    try:
        for width, scheme in ((1440, "light"), (390, "light"), (1440, "dark")):
            pg = Page(browser, viewport={"width": width, "height": 900}, color_scheme=scheme)
            try:
                p = pg.page
                p.goto(mon.base + "/#retention")
                panels = pg.wait_loaded()
                if width == 1440 and scheme == "light":
                    # never a dead panel: before any evaluation it says why
                    state, reason = panels["retention"]
                    assert state == "reason" and "state.db" in reason, panels["retention"]
                    write_matrix(home.path)               # two jobs evaluated, the second one held
                _wait_columns(p, 2)
                t = _table(p)
                assert t["state"] == "data"
                # one row per dataset, the reference set first; the hostile name is text
                assert t["rows"] == ["reference: general.jsonl", f"{XSS_DATASET} #1", "reverse.jsonl #2"]
                assert t["cols"] == ["1", "2"] and t["held"] == ["2"]
                assert t["marks"]["2"] == [["held", HELD_REASON]] and [m[0] for m in t["marks"]["1"]] == ["live"]
                ref, add, rev = t["cells"]
                assert ref[0][:2] == ["9.07 (-9.51)", "lower"] and "since the base model" in ref[0][2]
                assert add[0][:2] == ["2.05", None] and "learned here" in add[0][2]
                assert add[1][:2] == ["9.18 (+7.13)", "higher"] and "(+347 %)" in add[1][2]
                assert rev[0][0] == "" and "not evaluated" in rev[0][2] and rev[1][0] == "5.07"
                # colour: green for lower, red for higher
                bg = p.evaluate("""() => [...document.querySelectorAll('#retention-table td[data-change]')]
                    .map(td => [td.dataset.change, getComputedStyle(td).backgroundColor])""")
                for change, colour in bg:
                    r, g, _ = (int(x) for x in colour[colour.index("(") + 1:colour.index(")")].split(",")[:3])
                    assert (g > r) if change == "lower" else (r > g), (change, colour)
                notes = p.text_content("#retention-notes")
                assert HELD_REASON in notes and f"trainer-ctl promote {HELD_SNAPSHOT}" in notes
                assert f"current_model/ is the adapter after job 1 ({XSS_DATASET})" in notes
                assert p.locator("img, #retention-table script").count() == 0
                sw, vw = p.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
                assert sw <= vw, f"the page is {sw} px wide at a {vw} px viewport"
                _shot(p, f"retention_{width}px{'_dark' if scheme == 'dark' else ''}.png")
                assert pg.errors == [] and pg.dialogs == []
            finally:
                pg.close()
    finally:
        mon.stop()


def test_live_columns_promote_and_a_table_wider_than_a_phone(browser, tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    write_matrix(home.path, extra_jobs=6)          # 8 adapters: wider than 390 px
    mon = Monitor(home.path).start()
    pg = Page(browser, viewport={"width": 390, "height": 844})
    try:
        p = pg.page
        p.goto(mon.base + "/#retention")
        pg.wait_loaded()
        _wait_columns(p, 8)
        t = _table(p)
        assert len(t["rows"]) == 9 and t["held"] == ["2"]
        assert t["cells"][1][2][0] == "skipped" and "time budget" in t["cells"][1][2][2]
        # the table scrolls inside its box, the page does not
        inner = p.evaluate("() => { const s = document.querySelector('#retention .heat-scroll');"
                           " return [s.scrollWidth, s.clientWidth]; }")
        assert inner[0] > inner[1], inner
        sw, vw = p.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
        assert sw <= vw, f"the page is {sw} px wide at a {vw} px viewport"
        # live: a new column and a promote arrive over the stream
        db = StateDB(Layout(home.path).state_db)
        try:
            evaltable.add_rows(db, 9, "last.jsonl", [row(0, "reference: general.jsonl", 7.0, baseline=18.5768),
                                                     row(9, "last.jsonl", 1.5)])
            db.add_event("promoted", f"promoted snapshots/{HELD_SNAPSHOT}",
                         data={"action": "promote", "snapshot": f"snapshots/{HELD_SNAPSHOT}"})
        finally:
            db.close()
        (home.path / "current_model/trainer_state.json").write_text(json.dumps({"datasets": [
            {"job_id": 1}, {"job_id": 2}]}))
        _wait_columns(p, 9)
        p.wait_for_function("() => [...document.querySelectorAll('#retention-table th[data-job=\"2\"] .mark')]"
                            ".map(m => m.textContent).join() === 'held,promoted,live'", timeout=10000)
        assert len(_table(p)["rows"]) == 10
        assert "promoted snapshots/" + HELD_SNAPSHOT in p.text_content("#retention-notes")
        _shot(p, "retention_wide_390px.png")
        assert pg.errors == [] and pg.dialogs == []
    finally:
        pg.close()
        mon.stop()


@pytest.mark.slow
def test_one_row_per_dataset_during_a_real_tiny_run(browser, tmp_path: Path) -> None:
    """The real daemon and QLoRA worker on the tiny base, two jobs (a plus b, then reverse the word)
    with a reference set and the promotion gate: the page fills in as the jobs finish."""
    from daemon.generator import generate_records
    from trainer.tiny_base import build_tiny_base

    base = build_tiny_base(tmp_path / "tiny-base", seed=0)
    cfg = dict(trainer="qlora", base_model=str(base), max_length=96, batch_size=4, gradient_accumulation=1,
               learning_rate=5e-3, lr_scheduler="constant", checkpoint_every_steps=50,
               layer_activity_every_steps=50, worker_timeout_s=120, eval_fraction=0.05, eval_max_examples=12,
               retention_eval_datasets=20, reference_eval_file="general.jsonl", promotion_gate=True,
               max_retention_regression=0.05)
    home = make_home(tmp_path / "home", **cfg)
    write_jsonl(home.path / "general.jsonl", generate_records(20, seed=9, kind="syllables"))
    home.launch()
    mon = Monitor(home.path).start()
    pg = Page(browser, viewport={"width": 1440, "height": 900})
    try:
        p = pg.page
        p.goto(mon.base + "/#retention")
        panels = pg.wait_loaded()
        assert panels["retention"][0] == "reason" and "no retention evaluations yet" in panels["retention"][1]
        write_jsonl(home.path / "inbox/add.jsonl", generate_records(120, seed=7))
        _wait_columns(p, 1, timeout=300, home=home, mon=mon)
        t = _table(p)
        assert t["rows"] == ["reference: general.jsonl", "add.jsonl #1"] and t["held"] == []
        wait_for(lambda: "add.jsonl" in home.files("done"), timeout=60, what="add.jsonl done")
        home.write_config(**{**cfg, "epochs": 2})         # B: two epochs, it forgets "a plus b"
        write_jsonl(home.path / "inbox/reverse.jsonl", reverse_records(120, seed=8))
        _wait_columns(p, 2, timeout=300, home=home, mon=mon)
        p.wait_for_function(f"() => document.querySelectorAll('{ROWS}').length === 3", timeout=10000)
        # the loss chart does not join the two jobs across the idle time between them: one null
        t_loss = p.evaluate("() => window.trainerCharts['chart-loss'].u.data[0]")
        gaps = p.evaluate("() => window.trainerCharts['chart-loss'].u.data[1].flatMap((v, i) => v === null ? [i] : [])")
        assert len(gaps) == 1 and t_loss[gaps[0] - 1] < t_loss[gaps[0]] < t_loss[gaps[0] + 1], gaps
        # the gate held B back (it forgot add.jsonl by far more than 5 %): its column says so
        p.wait_for_function("() => document.querySelectorAll('#retention-table thead th.held').length === 1",
                            timeout=60000)
        with httpx.Client(base_url=mon.base, timeout=10) as c:
            e = c.get("/api/eval").json()
        t = _table(p)
        assert t["rows"] == ["reference: general.jsonl", "add.jsonl #1", "reverse.jsonl #2"]
        assert len(e["datasets"]) == 3 and t["cols"] == ["1", "2"]
        add_after_b = next(d for d in e["datasets"] if d["name"] == "add.jsonl")["cells"][1]
        assert t["cells"][1][1][0] == f"{add_after_b['loss']:.2f} ({add_after_b['change']:+.2f})"
        held = e["columns"][1]["held"]
        assert held["reason"].startswith("held: forgot add.jsonl by ")
        assert _table(p)["marks"]["2"][0] == ["held", held["reason"]]
        assert held["reason"] in p.text_content("#retention-notes")
        # trainer-ctl promote (the daemon stopped), then rollback to A's own snapshot: marked live
        stop_daemon(home)
        r = home.ctl("promote", held["snapshot"])
        assert r.returncode == 0, r.stderr
        p.wait_for_function("() => [...document.querySelectorAll('#retention-table th[data-job=\"2\"] .mark')]"
                            ".map(m => m.textContent).join() === 'held,promoted,live'", timeout=10000)
        metas = {d.name: json.loads((d / "snapshot.json").read_text())
                 for d in (home.path / "snapshots").iterdir() if (d / "snapshot.json").is_file()}
        a_snap = next(n for n, m in metas.items() if m.get("job_id") == 1 and not m.get("kind"))
        r = home.ctl("rollback", a_snap)
        assert r.returncode == 0, r.stderr
        p.wait_for_function("() => [...document.querySelectorAll('#retention-table th[data-job=\"1\"] .mark')]"
                            ".map(m => m.textContent).join() === 'rolled back,live'", timeout=10000)
        assert f"rolled back to snapshots/{a_snap}" in p.text_content("#retention-notes")
        time.sleep(0.5)
        _shot(p, "retention_real_run_1440px.png")
        p.set_viewport_size({"width": 390, "height": 844})
        time.sleep(0.3)
        sw, vw = p.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")
        assert sw <= vw
        _shot(p, "retention_real_run_390px.png")
        assert pg.errors == [] and pg.dialogs == []
    finally:
        pg.close()
        mon.stop()
        home.kill_all()
