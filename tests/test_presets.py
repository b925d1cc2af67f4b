"""Presets: per-preset overrides, adapters and locked keys; switching only while idle."""
from __future__ import annotations

import json
import os

import pytest

from daemon_helpers import STANDIN, text_records, wait_for, write_jsonl
from core.config import ConfigError, parse_config
from core.paths import Layout
from daemon.presets import JOURNAL, recover_preset_switch, switch_preset
from core.statedb import StateDB

PRESETS = {"small": {"max_length": 64, "model_name": "small"}, "full": {"max_length": 256, "model_name": "full"}}


def _config(home, **extra):
    home.write_config(presets=PRESETS, active_preset="small", **extra)


def test_active_preset_is_merged_and_every_preset_validated():
    cfg = parse_config({**STANDIN, "presets": PRESETS, "active_preset": "full"})
    assert cfg.max_length == 256 and cfg.model_name == "full" and cfg.locked_namespace == "full"
    with pytest.raises(ConfigError) as e:
        parse_config({"presets": {"a": {"lora_r": 0}, "b": {"presets": {}}}, "active_preset": "c"})
    msg = str(e.value)
    assert "presets.a.lora_r" in msg and "presets.b: cannot set presets" in msg and "no preset named 'c'" in msg


def test_switch_refused_mid_job_then_allowed_when_idle(home):
    _config(home, standin_step_seconds=0.05)
    home.launch()
    write_jsonl(home.path / "inbox/long.jsonl", text_records(200))
    wait_for(lambda: home.status().get("status") == "training", what="training")
    r = home.ctl("preset", "full")
    assert r.returncode == 1 and "long.jsonl is training" in r.stderr
    assert json.loads((home.path / "config.json").read_text())["active_preset"] == "small"
    home.ctl("skip")
    wait_for(lambda: home.status().get("status") == "idle", what="idle")
    r = home.ctl("preset", "full")
    assert r.returncode == 0, r.stderr
    assert json.loads((home.path / "config.json").read_text())["active_preset"] == "full"
    assert "* full" in home.ctl("preset").stdout


def test_each_preset_keeps_its_adapter_and_locked_keys(home):
    _config(home)
    layout = Layout(home.path)
    write_jsonl(home.path / "inbox/a.jsonl", text_records(2, "a"))
    assert home.burst().returncode == 0
    layout.current_model.mkdir()
    (layout.current_model / "adapter_model.safetensors").write_bytes(b"small adapter")
    assert home.ctl("preset", "full").returncode == 0          # daemon down: applied directly
    assert not layout.current_model.exists()
    assert (home.path / "current_model_small/adapter_model.safetensors").read_bytes() == b"small adapter"
    write_jsonl(home.path / "inbox/b.jsonl", text_records(2, "b"))
    assert home.burst().returncode == 0
    db = StateDB(layout.state_db)
    assert db.locked("small")["max_length"] == 64 and db.locked("full")["max_length"] == 256
    assert home.status()["last_error"] is None                 # no locked-key complaint
    layout.current_model.mkdir()
    (layout.current_model / "adapter_model.safetensors").write_bytes(b"full adapter")
    assert home.ctl("preset", "small").returncode == 0
    assert (layout.current_model / "adapter_model.safetensors").read_bytes() == b"small adapter"
    assert (home.path / "current_model_full/adapter_model.safetensors").read_bytes() == b"full adapter"
    r = home.ctl("preset", "nope")
    assert r.returncode == 1 and "no preset named 'nope'" in r.stderr


@pytest.mark.parametrize("crash_after", ["journal", "parked", "unparked", "committed"])
def test_interrupted_switch_recovers_to_old_or_new(tmp_path, crash_after):
    """Replay the switch's steps by hand up to a crash point, then recover."""
    layout = Layout(tmp_path / "h")
    layout.ensure()
    raw = {**STANDIN, "presets": PRESETS, "active_preset": "small"}
    layout.config.write_text(json.dumps(raw))
    layout.current_model.mkdir()
    (layout.current_model / "w").write_text("small")
    full = layout.home / "current_model_full"
    full.mkdir()
    (full / "w").write_text("full")
    (layout.status_dir / JOURNAL).write_text(json.dumps({"from": "small", "to": "full"}))
    steps = ["journal", "parked", "unparked", "committed"]
    if steps.index(crash_after) >= 1:
        os.rename(layout.current_model, layout.home / "current_model_small")
    if steps.index(crash_after) >= 2:
        os.rename(full, layout.current_model)
    if steps.index(crash_after) >= 3:
        layout.config.write_text(json.dumps({**raw, "active_preset": "full"}))
    what = recover_preset_switch(layout)
    active = json.loads(layout.config.read_text())["active_preset"]
    expected = "full" if crash_after == "committed" else "small"
    assert active == expected and what
    assert (layout.current_model / "w").read_text() == expected
    other = "small" if expected == "full" else "full"
    assert (layout.home / f"current_model_{other}" / "w").read_text() == other
    assert not (layout.status_dir / JOURNAL).exists()
    assert "already active" in switch_preset(layout, expected)
