"""config.json: validated on load; locked keys refused after first use until unlocked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon_helpers import STANDIN, text_records, write_jsonl
from core.config import ConfigError, load_config
from daemon.main import Daemon
from core.paths import Layout
from core.statedb import StateDB
from daemon.standin import StandInTrainer


class RecordingStandIn(StandInTrainer):
    """The real stand-in trainer, remembering the config each job was given."""
    seen: list[dict] = []

    def run(self, job, sink, control):
        RecordingStandIn.seen.append(job.config)
        return super().run(job, sink, control)


def _run(home: Path, **cfg) -> Daemon:
    (home / "config.json").write_text(json.dumps({**STANDIN, "standin_step_seconds": 0, **cfg}))
    d = Daemon(Layout(home), trainer_factory=lambda c: RecordingStandIn(0))
    d.run(burst=True)
    return d


def test_validation_names_every_bad_key(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"max_length": 0, "lora_r": "x", "monitor": {"port": 70000}, "typo_key": 1}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    for key in ("max_length", "lora_r", "monitor.port", "typo_key: unknown key"):
        assert key in msg
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p)


def test_locked_key_edit_is_refused_until_unlocked(home):
    RecordingStandIn.seen.clear()
    write_jsonl(home.path / "inbox/one.jsonl", text_records(1, "one"))
    _run(home.path, max_length=256, batch_size=4)
    assert RecordingStandIn.seen[-1]["max_length"] == 256
    write_jsonl(home.path / "inbox/two.jsonl", text_records(1, "two"))
    _run(home.path, max_length=1024, batch_size=4)
    assert RecordingStandIn.seen[-1]["max_length"] == 256          # recorded value kept
    st = home.status()
    assert "max_length: recorded 256, config.json has 1024" in st["last_error"]["message"]
    assert "trainer-ctl config unlock max_length" in st["last_error"]["message"]
    events = StateDB(home.path / "status/state.db").events()
    assert any(e["kind"] == "locked_key" and e["level"] == "error" for e in events)
    r = home.ctl("config", "unlock", "max_length")
    assert r.returncode == 0 and "unlocked max_length" in r.stdout
    write_jsonl(home.path / "inbox/three.jsonl", text_records(1, "three"))
    _run(home.path, max_length=1024, batch_size=4)
    assert RecordingStandIn.seen[-1]["max_length"] == 1024
    shown = json.loads(home.ctl("config", "show").stdout)
    assert shown["locked"]["max_length"] == 1024
    r = home.ctl("config", "unlock", "learning_rate")
    assert r.returncode == 2


def test_invalid_edit_while_running_keeps_previous_settings(home):
    RecordingStandIn.seen.clear()
    (home.path / "config.json").write_text(json.dumps({**STANDIN, "standin_step_seconds": 0}))
    d = Daemon(Layout(home.path), trainer_factory=lambda c: RecordingStandIn(0))
    (home.path / "config.json").write_text('{"max_length": "huge"}')
    write_jsonl(home.path / "inbox/a.jsonl", text_records(1))
    d.run(burst=True)
    assert RecordingStandIn.seen[-1]["trainer"] == "standin"
    assert "keeping the previous valid settings" in home.status()["last_error"]["message"]
