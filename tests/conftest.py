"""The `home` fixture: a fresh base dir per test; its daemons are SIGKILLed at teardown."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.paths import Layout
from daemon_helpers import Home


@pytest.fixture
def home(tmp_path: Path):
    h = Home(tmp_path / "home")
    Layout(h.path).ensure()
    h.write_config()
    yield h
    h.kill_all()
