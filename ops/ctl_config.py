"""trainer-ctl config commands: show the config, unlock a locked key, list or switch presets."""
from __future__ import annotations

import argparse
import json

from core.config import LORA_KEYS, ConfigError, load_config, locked_namespace
from core.paths import Layout
from core.statedb import StateDB
from ops.ctl_common import EXIT_OK, EXIT_USAGE, err, open_db, submit


def _namespace(layout: Layout) -> str:
    try:
        return locked_namespace(json.loads(layout.config.read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, AttributeError):
        return ""


def cmd_config_unlock(layout: Layout, args: argparse.Namespace) -> int:
    layout.status_dir.mkdir(parents=True, exist_ok=True)
    ns = _namespace(layout)
    now = None
    if args.key in LORA_KEYS:        # the change is the point: take config.json's value now
        try:
            now = load_config(layout.config).locked_values()[args.key]
        except ConfigError as exc:
            err(str(exc))
            return EXIT_USAGE
    db = StateDB(layout.state_db)
    try:
        was = db.locked(ns).get(args.key)
        removed = db.unlock(args.key, ns)
        if removed:
            db.add_event("unlocked", f"locked key {args.key} unlocked by trainer-ctl (was {was!r})", level="warning")
        if now is not None:
            db.record_locked({args.key: now}, ns)
    finally:
        db.close()
    if now is not None:
        change = f"{was!r} -> {now!r}" if removed else f"now {now!r}"
        print(f"unlocked {args.key} ({change}): the next job starts a fresh adapter with it if "
              "current_model/ was made with another value (the current adapter stays in snapshots/)")
    elif not removed:
        print(f"{args.key} was not locked; the value in config.json is recorded when the next job starts")
    else:
        print(f"unlocked {args.key} (was {was!r}); the value in config.json is recorded when the next job starts")
    return EXIT_OK


def cmd_config_show(layout: Layout, args: argparse.Namespace) -> int:
    try:
        cfg = load_config(layout.config)
    except ConfigError as exc:
        err(str(exc))
        return EXIT_USAGE
    db = open_db(layout)
    locked = db.locked(cfg.locked_namespace) if db else {}
    if db:
        db.close()
    print(json.dumps({"config": cfg.model_dump(mode="json"), "locked": locked}, indent=2))
    return EXIT_OK


def cmd_preset(layout: Layout, args: argparse.Namespace) -> int:
    if args.name is None:
        raw = json.loads(layout.config.read_text(encoding="utf-8")) if layout.config.exists() else {}
        active = raw.get("active_preset")
        for name in raw.get("presets") or {}:
            print(f"{'*' if name == active else ' '} {name}")
        if not raw.get("presets"):
            print("no presets in config.json")
        return EXIT_OK
    return submit(layout, "preset_switch", name=args.name)
