"""LoRA keys honest: once an adapter exists, an edit of lora_r (alpha, dropout, target modules)
is refused with a clear message instead of being silently ignored; `trainer-ctl config unlock
lora_r` takes the new value, and the next job starts a fresh adapter and says so."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.artifacts import current_lora, recorded_lora
from core.statedb import StateDB
from daemon.generator import generate_records
from daemon_helpers import write_jsonl
from trainer.resume import lora_change

BASE_CFG = dict(trainer="qlora", max_length=128, batch_size=2, gradient_accumulation=1,
                learning_rate=2e-3, lr_scheduler="constant", checkpoint_every_steps=50,
                layer_activity_every_steps=50, worker_timeout_s=120)


def _train(home, base: Path, name: str, seed: int, **cfg) -> dict:
    home.write_config(base_model=str(base), **BASE_CFG, **cfg)
    write_jsonl(home.path / "inbox" / name, generate_records(12, seed=seed))
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert name in home.files("done"), home.ctl("queue", "list").stdout
    return json.loads((home.path / "current_model/trainer_state.json").read_text())


def _adapter_r(home) -> int:
    return json.loads((home.path / "current_model/adapter_config.json").read_text())["r"]


@pytest.mark.slow
def test_a_lora_edit_is_refused_then_unlock_starts_a_fresh_adapter(home, tiny_base):
    state = _train(home, tiny_base, "one.jsonl", 1, lora_r=4)
    assert _adapter_r(home) == 4 and state["lora_config"]["lora_r"] == 4

    # an edit once the adapter exists: refused, said plainly, the adapter keeps its shape
    state = _train(home, tiny_base, "two.jsonl", 2, lora_r=8)
    assert _adapter_r(home) == 4 and [d["name"] for d in state["datasets"]] == ["one.jsonl", "two.jsonl"]
    msg = home.status()["last_error"]["message"]
    assert "lora_r: recorded 4, config.json has 8" in msg and "trainer-ctl config unlock lora_r" in msg

    r = home.ctl("config", "unlock", "lora_r")
    assert r.returncode == 0 and "unlocked lora_r (4 -> 8)" in r.stdout and "fresh adapter" in r.stdout, r.stdout

    # the next job starts a fresh adapter with r 8 and says so; its lineage starts with it
    state = _train(home, tiny_base, "three.jsonl", 3, lora_r=8)
    assert _adapter_r(home) == 8 and state["lora_config"]["lora_r"] == 8
    assert [d["name"] for d in state["datasets"]] == ["three.jsonl"]
    assert state["fresh_after"]["reason"] == "lora_r 4 -> 8" and state["fresh_after"]["datasets"] == 2
    db = StateDB(home.path / "status/state.db")
    try:
        fresh = [e for e in db.events(limit=500) if e["kind"] == "fresh_adapter"]
    finally:
        db.close()
    assert len(fresh) == 1 and "lora_r 4 -> 8" in fresh[0]["message"], fresh
    # the previous adapter is still there, in the snapshot of the job before
    snaps = sorted((home.path / "snapshots").iterdir())
    assert len(snaps) == 3
    assert json.loads((snaps[1] / "adapter_config.json").read_text())["r"] == 4


def test_an_adapter_made_before_the_lock_keeps_its_own_settings(home):
    """A home from before LoRA keys were locked: its adapter's settings are what is recorded,
    so a config.json that differs is refused (said), not silently turned into a fresh adapter."""
    old_state = {"datasets": [{"name": "a.jsonl"}], "total_steps": 3,
                 "lora": {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": ["q_proj"]}}
    assert recorded_lora(old_state) == {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}
    assert lora_change(old_state, {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}) is None
    assert lora_change(old_state, {"lora_r": 8, "lora_alpha": 32.0, "lora_dropout": 0.1}) == \
        "lora_r 16 -> 8, lora_dropout 0.05 -> 0.1"
    (home.path / "current_model").mkdir()
    (home.path / "current_model/trainer_state.json").write_text(json.dumps(old_state))
    assert current_lora(home.path) == {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}

    from core.paths import Layout
    from daemon.main import Daemon
    home.write_config(trainer="standin", lora_r=8)
    d = Daemon(Layout(home.path))
    try:
        cfg = d.effective_config()
        assert cfg.lora_r == 16                              # the adapter's, not config.json's
        assert "lora_r: recorded 16, config.json has 8" in d.board.state["last_error"]["message"]
        assert d.db.locked("")["lora_dropout"] == 0.05
    finally:
        d.db.close()
        (home.path / ".daemon.pid").unlink(missing_ok=True)
