"""Bounded growth: leftovers of killed runs removed at start-up, retention after each job.

(Filled in by the retention work of issue 9 item 6.)
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from daemon.paths import Layout

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.statedb import StateDB

log = logging.getLogger("trainerd.retention")


def startup_cleanup(layout: Layout) -> list[str]:
    """Remove what a killed daemon or worker left behind (no worker runs at daemon start)."""
    return []


def after_job(layout: Layout, db: "StateDB", cfg: "Config") -> list[str]:
    """Apply the retention settings; returns what was removed or rotated."""
    return []
