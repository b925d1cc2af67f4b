"""Presets: named sets of config overrides (e.g. a small model and a full one), each with its
own adapter. The active preset's adapter lives in ``current_model/``; the others are parked as
``current_model_<name>/`` (``current_model_default/`` for no preset). Locked keys are recorded
per preset (state.db namespaces), so switching never trips the locked-key guard.

A switch happens only when no job is mid-way, and is journalled like a consolidation:
1. ``status/preset_switch.json`` {from, to}; 2. park ``current_model/``; 3. unpark the target's;
4. config.json ``active_preset`` = to (the commit point); 5. remove the journal.
``recover_preset_switch`` rolls back (config still names *from*) or forward (it names *to*).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_json, durable_rename, read_json
from core.config import ConfigError, parse_config
from core.paths import Layout
from core.states import JobState

log = logging.getLogger("trainerd.presets")

JOURNAL = "preset_switch.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PresetError(RuntimeError):
    pass


def parked_dir(layout: Layout, name: str | None) -> Path:
    return layout.home / f"current_model_{name or 'default'}"


def _raw(layout: Layout) -> dict[str, Any]:
    try:
        return json.loads(layout.config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _move_if(src: Path, dst: Path) -> None:
    if src.exists() and not dst.exists():
        durable_rename(src, dst)


def recover_preset_switch(layout: Layout) -> str | None:
    journal_path = layout.status_dir / JOURNAL
    journal = read_json(journal_path)
    if not isinstance(journal, dict):
        return None
    src, dst = journal.get("from"), journal.get("to")
    cur, parked_src, parked_dst = layout.current_model, parked_dir(layout, src), parked_dir(layout, dst)
    if _raw(layout).get("active_preset") == dst:        # committed: finish steps 2-3
        if parked_dst.exists():                         # step 3 not done: cur (if any) is src's
            _move_if(cur, parked_src)
            _move_if(parked_dst, cur)
        what = f"preset switch {src!r} -> {dst!r} completed"
    else:                                               # not committed: undo steps 2-3
        if parked_src.exists():                         # step 2 done: cur (if any) is dst's
            _move_if(cur, parked_dst)
            _move_if(parked_src, cur)
        what = f"preset switch {src!r} -> {dst!r} rolled back"
    journal_path.unlink(missing_ok=True)
    log.warning("%s after an interruption", what)
    return what


def switch_preset(layout: Layout, name: str) -> str:
    """Make *name* the active preset (``none`` for no preset). Refused while a job is mid-way."""
    recover_preset_switch(layout)
    raw = _raw(layout)
    target = None if name in ("none", "default") else name
    presets = raw.get("presets") or {}
    if target is not None and (not _NAME.match(target) or target not in presets):
        raise PresetError(f"no preset named {name!r} in config.json (have: {', '.join(presets) or 'none'})")
    current = raw.get("active_preset")
    if current == target:
        return f"preset {name!r} is already active"
    busy = [p.name for p in layout.state_dir(JobState.PROCESSING).iterdir()
            if not p.name.startswith(".")] if layout.state_dir(JobState.PROCESSING).exists() else []
    midway = [p.name for p in layout.checkpoints.glob("job-*") if p.is_dir()]
    if busy or midway:
        raise PresetError(f"refused: a job is mid-way ({', '.join(busy or midway)}); switch presets "
                          "when the queue is idle (or skip the job)")
    new_raw = {**raw, "active_preset": target}
    if target is None:
        new_raw.pop("active_preset")
    try:
        parse_config(new_raw)
    except ConfigError as exc:
        raise PresetError(f"preset {name!r} would give an invalid config: {exc}") from None
    if layout.current_model.exists() and parked_dir(layout, current).exists():
        raise PresetError(f"{parked_dir(layout, current)} already exists; move it away first")
    layout.status_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.status_dir / JOURNAL, {"from": current, "to": target, "pid": os.getpid()})
    _move_if(layout.current_model, parked_dir(layout, current))
    _move_if(parked_dir(layout, target), layout.current_model)
    atomic_write_json(layout.config, new_raw)            # the commit point
    (layout.status_dir / JOURNAL).unlink()
    adapter = "its own adapter" if layout.current_model.exists() else "a fresh adapter"
    return f"preset {name!r} active (was {current or 'none'}); training continues on {adapter}"
