"""The monitor: a FastAPI service and live dashboard for the continuous fine-tuning daemon.

It only reads the daemon's status/state files and writes control requests (like trainer-ctl);
it never imports torch or the trainer. Start it with ``python -m monitor`` (or bin/monitor.sh).
"""
from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Lazy re-export of :func:`monitor.app.create_app` (keeps ``import monitor`` light)."""
    from monitor.app import create_app as _create
    return _create(*args, **kwargs)
