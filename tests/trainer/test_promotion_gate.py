"""The promotion gate: with ``promotion_gate`` on, an adapter that made an earlier dataset's retention
loss worse by more than ``max_retention_regression`` does not become current_model/; it is kept as a
held snapshot, and ``trainer-ctl promote`` / ``rollback`` move current_model/ (journalled, recorded
in the lineage). Real tiny model, real daemon, real trainer-ctl; the journal's crash points."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from core.artifacts import fill_dir, write_manifest
from core.config import ConfigError, parse_config
from core.lock import DaemonLock
from core.paths import Layout
from core.promotion import CRASH_POINTS, journal_path, recover_promotion, switch_current
from core.statedb import StateDB
from daemon.generator import generate_records
from daemon_helpers import reverse_records, write_jsonl


CFG = dict(trainer="qlora", max_length=96, batch_size=4, gradient_accumulation=1, learning_rate=5e-3,
           lr_scheduler="constant", checkpoint_every_steps=50, layer_activity_every_steps=50,
           worker_timeout_s=120, eval_fraction=0.05, eval_max_examples=12, retention_eval_datasets=20)
WEIGHTS = "adapter_model.safetensors"


def weights_hash(d: Path) -> str:
    return hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()


def events(home, *kinds: str) -> list[dict]:
    db = StateDB(home.path / "status/state.db")
    try:
        return [e for e in db.events(limit=1000) if e["kind"] in kinds]
    finally:
        db.close()


def snapshot_meta(home) -> dict[str, dict]:
    return {p.name: json.loads((p / "snapshot.json").read_text())
            for p in sorted((home.path / "snapshots").iterdir()) if (p / "snapshot.json").is_file()}


def train(home, tiny_base: Path, name: str, records: list[dict], **cfg) -> None:
    home.write_config(base_model=str(tiny_base), **{**CFG, "promotion_gate": True, **cfg})
    write_jsonl(home.path / "inbox" / name, records)
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert name in home.files("done"), home.ctl("queue", "list").stdout


@pytest.mark.slow
def test_the_gate_holds_b_back_then_promote_and_rollback_move_current_model(home, tiny_base, capsys):
    cur = home.path / "current_model"
    train(home, tiny_base, "add.jsonl", generate_records(120, seed=7), max_retention_regression=0.05)
    a_hash = weights_hash(cur)
    a_state = json.loads((cur / "trainer_state.json").read_text())
    assert a_state["retention"]["losses"].keys() == {"1"}      # the reference the next job is judged by

    # B: reverse the word, 2 epochs, no replay: it forgets "add" far past 5 %
    train(home, tiny_base, "reverse.jsonl", reverse_records(120, seed=8), epochs=2, max_retention_regression=0.05)
    assert home.files("done") == ["add.jsonl", "reverse.jsonl"]     # trained, not a failure
    assert weights_hash(cur) == a_hash                                # current_model/ is still A's
    assert [d["name"] for d in json.loads((cur / "trainer_state.json").read_text())["datasets"]] == ["add.jsonl"]
    held = [n for n, m in snapshot_meta(home).items() if m.get("kind") == "held"]
    assert len(held) == 1 and held[0].endswith("__reverse__held"), snapshot_meta(home)
    held_dir = home.path / "snapshots" / held[0]
    gate = snapshot_meta(home)[held[0]]["gate"]
    worst = gate["regressions"][0]
    assert worst["dataset"] == "add.jsonl" and worst["relative_change"] > 0.05
    assert worst["loss"] > worst["reference_loss"] == pytest.approx(a_state["retention"]["losses"]["1"])
    assert [d["name"] for d in json.loads((held_dir / "trainer_state.json").read_text())["datasets"]] == \
        ["add.jsonl", "reverse.jsonl"]

    # visible: status, events, the forgetting matrix
    last = home.status()["last_job"]
    assert last["outcome"] == "completed" and last["reason"].startswith("held: forgot add.jsonl by ")
    assert last["reason"].endswith(" %") and last["held"]["snapshot"].endswith(held[0])
    (ev,) = events(home, "held")
    assert ev["level"] == "warning" and "forgot add.jsonl by" in ev["message"] and held[0] in ev["message"]
    assert f"{worst['reference_loss']:.4f} -> {worst['loss']:.4f}" in ev["message"]
    done = [e for e in events(home, "completed") if e["job_id"] == 2]
    assert "held" in done[0]["message"] and done[0]["level"] == "warning"
    db = StateDB(home.path / "status/state.db")
    try:                  # /metrics: trainer_jobs_finished_total{outcome="held"} 1, A's job "done"
        finished = {labels["outcome"]: v for name, labels, v in db.counters() if name == "trainer_jobs_finished"}
    finally:
        db.close()
    assert finished == {"done": 1.0, "held": 1.0}, finished
    r = home.ctl("status")
    assert "reverse.jsonl completed (held: forgot add.jsonl by" in r.stdout and f"promote {held[0]}" in r.stdout
    m = json.loads((home.path / "status/eval.json").read_text())
    add_row = next(d for d in m["datasets"] if d["name"] == "add.jsonl")
    assert add_row["cells"][1]["relative_change"] > 0.05

    # bad input: an unknown name is refused and the ones that exist are listed; nothing moves
    r = home.ctl("promote", "no-such-snapshot")
    assert r.returncode == 2 and "no snapshot named 'no-such-snapshot'" in r.stderr and held[0] in r.stderr
    assert weights_hash(cur) == a_hash and not journal_path(home.path).exists()
    # while the daemon (its lock) is there: refused, it says to stop it
    lock = DaemonLock(Layout(home.path)).acquire(wait_s=0)
    try:
        r = home.ctl("promote", held[0])
    finally:
        lock.release()
    assert r.returncode == 1 and "the daemon is running" in r.stderr and "trainer-ctl stop" in r.stderr
    # a snapshot made on another base
    other = home.path / "snapshots" / "other-base"
    shutil.copytree(held_dir, other)
    st = json.loads((other / "trainer_state.json").read_text())
    (other / "trainer_state.json").write_text(json.dumps({**st, "base_fingerprint": "0" * 64}))
    write_manifest(other)
    r = home.ctl("rollback", "other-base")
    assert r.returncode == 1 and "configured base" in r.stderr, r.stderr
    shutil.rmtree(other)
    assert weights_hash(cur) == a_hash

    # promote the held adapter: it becomes current_model/, A's is kept as a snapshot
    r = home.ctl("promote", held[0])
    assert r.returncode == 0, r.stderr
    assert weights_hash(cur) == weights_hash(held_dir)
    state = json.loads((cur / "trainer_state.json").read_text())
    assert [d["name"] for d in state["datasets"]] == ["add.jsonl", "reverse.jsonl"]
    assert state["switched"]["action"] == "promote" and state["switched"]["snapshot"] == f"snapshots/{held[0]}"
    backup = home.path / state["switched"]["previous"]
    assert weights_hash(backup) == a_hash and snapshot_meta(home)[backup.name]["kind"] == "pre-promote"

    # roll back to A's own snapshot (the one its job wrote)
    a_snap = next(n for n, m in snapshot_meta(home).items() if m.get("job_id") == 1 and not m.get("kind"))
    r = home.ctl("rollback", a_snap)
    assert r.returncode == 0 and "rolled back to" in r.stdout, r.stderr
    assert weights_hash(cur) == a_hash
    r = home.ctl("rollback", a_snap)              # once more: it already is current_model/
    assert r.returncode == 0 and "nothing was moved" in r.stdout

    # the lineage records both moves, and state.db has the events
    lin = json.loads(home.ctl("lineage", "--json").stdout)
    adapter = lin[0]
    assert adapter["kind"] == "adapter" and [d["name"] for d in adapter["datasets"]] == ["add.jsonl"]
    assert [(mv["action"], mv["snapshot"]) for mv in adapter["moves"]] == \
        [("promote", f"snapshots/{held[0]}"), ("rollback", f"snapshots/{a_snap}")]
    assert adapter["switched"]["action"] == "rollback"
    text = home.ctl("lineage").stdout
    assert f"promoted snapshots/{held[0]}" in text and f"rolled back to snapshots/{a_snap}" in text
    with capsys.disabled():
        print(f"\nheld event: {ev['message']}\nlineage after promote + rollback:\n{text}")
    assert [e["kind"] for e in events(home, "promoted", "rolled_back")] == ["promoted", "rolled_back"]


@pytest.mark.slow
def test_a_small_change_under_the_threshold_is_published(home, tiny_base):
    cur = home.path / "current_model"
    train(home, tiny_base, "add.jsonl", generate_records(120, seed=7), max_retention_regression=0.5)
    train(home, tiny_base, "more-add.jsonl", generate_records(120, seed=9), max_retention_regression=0.5)
    state = json.loads((cur / "trainer_state.json").read_text())
    assert [d["name"] for d in state["datasets"]] == ["add.jsonl", "more-add.jsonl"]
    assert set(state["retention"]["losses"]) == {"1", "2"}
    assert not [m for m in snapshot_meta(home).values() if m.get("kind") == "held"]
    (ev,) = events(home, "gate_passed")
    checked = ev["data"]["checked"]
    assert [c["dataset"] for c in checked] == ["add.jsonl"] and checked[0]["relative_change"] < 0.5
    assert "promotion gate passed" in ev["message"] and not events(home, "held")
    assert home.status()["last_job"]["held"] is None


def test_the_gate_needs_retention_sets():
    with pytest.raises(ConfigError, match="promotion_gate"):
        parse_config({"promotion_gate": True, "eval_fraction": 0})
    with pytest.raises(ConfigError, match="max_retention_regression"):
        parse_config({"max_retention_regression": -0.1})
    assert parse_config({"promotion_gate": True}).max_retention_regression == 0.05


# ---------------------------------------------------------------- the journal, crash by crash

def _adapter(d: Path, tag: str, datasets: list[str]) -> None:
    def files(t: Path) -> None:
        (t / "adapter_config.json").write_text(json.dumps({"r": 4}))
        (t / WEIGHTS).write_bytes(hashlib.sha256(tag.encode()).digest() * 64)
        (t / "trainer_state.json").write_text(json.dumps({"datasets": [{"name": n} for n in datasets]}))
    tmp = d.with_name(".w-" + d.name)
    fill_dir(tmp, files)
    tmp.rename(d)


def _fresh_home(root: Path) -> tuple[Path, str, str]:
    shutil.rmtree(root, ignore_errors=True)
    Layout(root).ensure()
    _adapter(root / "current_model", "A", ["a.jsonl"])
    (root / "snapshots").mkdir(exist_ok=True)
    _adapter(root / "snapshots/20260101_000000__b__held", "B", ["a.jsonl", "b.jsonl"])
    return root / "snapshots/20260101_000000__b__held", weights_hash(root / "current_model"), \
        weights_hash(root / "snapshots/20260101_000000__b__held")


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_a_crash_at_each_step_recovers_to_one_adapter(tmp_path, crash_at):
    root = tmp_path / "home"
    snap, old, new = _fresh_home(root)
    switch_current(root, snap, "promote", _crash_at=crash_at)
    assert journal_path(root).exists()
    what = recover_promotion(root)
    forward = crash_at in ("backup", "current")        # the staged adapter was complete and current moved
    assert what and what.startswith("rolled_forward" if forward else "rolled_back"), what
    assert weights_hash(root / "current_model") == (new if forward else old)
    assert not journal_path(root).exists() and not (root / "current_model.switch").exists()
    kept = [p for p in (root / "snapshots").iterdir() if "pre-promote" in p.name]
    if forward:                                   # the old adapter is a snapshot, described
        assert len(kept) == 1 and weights_hash(kept[0]) == old
        assert json.loads((kept[0] / "snapshot.json").read_text())["kind"] == "pre-promote"
    else:
        assert kept == []
    assert weights_hash(snap) == new              # the snapshot itself is never moved
    assert recover_promotion(root) is None        # nothing left to do


def test_a_torn_staged_adapter_rolls_back_and_the_daemon_recovers_at_start(home, tmp_path):
    root = home.path
    shutil.rmtree(root / "current_model", ignore_errors=True)
    _adapter(root / "current_model", "A", ["a.jsonl"])
    (root / "snapshots").mkdir(exist_ok=True)
    _adapter(root / "snapshots/x__held", "B", ["a.jsonl", "b.jsonl"])
    old = weights_hash(root / "current_model")
    # current_model/ moved aside, the staged copy incomplete (no manifest): back to the old adapter
    switch_current(root, root / "snapshots/x__held", "rollback", _crash_at="backup")
    (root / "current_model.switch/manifest.json").unlink()
    assert not (root / "current_model").exists()
    r = home.burst(timeout=60)                   # the daemon recovers before anything reads current_model/
    assert r.returncode == 0, r.stderr[-2000:]
    assert weights_hash(root / "current_model") == old
    assert not journal_path(root).exists() and not (root / "current_model.switch").exists()
    assert [e["kind"] for e in events(home, "promotion_recovered")] == ["promotion_recovered"]
