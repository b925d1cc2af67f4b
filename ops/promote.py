"""trainer-ctl promote / rollback: make a snapshot the live adapter (current_model/).

``promote`` is meant for a candidate the promotion gate held back (``snapshots/*__held``),
``rollback`` for an earlier adapter; both are the same journalled move (core/promotion.py
``switch_current``): the previous current_model/ is kept as ``snapshots/<ts>__pre-<action>/``, a
crash at any point recovers to the old or the new adapter, state.db records a ``promoted`` /
``rolled_back`` event, which ``trainer-ctl lineage`` lists.

Refused, with nothing moved: an unknown snapshot (the message lists those that exist), one that
is incomplete (its manifest does not verify) or holds no adapter, one made on another base (its
``base_fingerprint`` is not the configured base's), while the daemon runs (stop it first: it
could be swapping current_model/ at the end of a job), and during a consolidation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, SNAPSHOT_META, TRAINER_STATE, recorded_lora
from core.config import LORA_KEYS
from core.lock import AlreadyRunning, DaemonLock
from core.paths import Layout
from core.promotion import PromotionError, recover_promotion, switch_current
from core.switch import consolidation_lock, recover_locked
from ops.ctl_common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, err, raw_config

SHOWN = 20


class UnknownSnapshot(PromotionError):
    """No such snapshot (bad input)."""


def snapshots(layout: Layout) -> list[tuple[str, dict[str, Any]]]:
    """(name, snapshot.json) of every snapshot folder, newest name first (hidden ones left out)."""
    if not layout.snapshots.is_dir():
        return []
    out = []
    for p in sorted(layout.snapshots.iterdir(), reverse=True):
        if p.is_dir() and not p.name.startswith("."):
            try:
                meta = json.loads((p / SNAPSHOT_META).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {}
            out.append((p.name, meta if isinstance(meta, dict) else {}))
    return out


def _describe(name: str, meta: dict[str, Any]) -> str:
    kind = meta.get("kind") or "after job"
    last = meta.get("dataset") or ((meta.get("datasets") or [{}])[-1] or {}).get("name")
    return f"{name} ({kind}{', ' + str(last) if last else ''})"


def resolve_snapshot(layout: Layout, name: str) -> Path:
    """snapshots/NAME (NAME, snapshots/NAME or a path to it); UnknownSnapshot lists what exists."""
    raw = Path(name)
    cand = raw if raw.is_absolute() else layout.home / raw if raw.parent != Path(".") else layout.snapshots / raw
    cand = cand.resolve()
    if cand.parent == layout.snapshots.resolve() and cand.is_dir() and not cand.name.startswith("."):
        return layout.snapshots / cand.name
    have = snapshots(layout)
    listed = "\n  ".join(_describe(n, m) for n, m in have[:SHOWN])
    more = f"\n  ... and {len(have) - SHOWN} more" if len(have) > SHOWN else ""
    raise UnknownSnapshot(f"no snapshot named {name!r} in {layout.snapshots}; "
                          + (f"there are (newest first):\n  {listed}{more}" if have else "there are none yet"))


def check_snapshot(layout: Layout, snap: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The snapshot's trainer_state if it can become current_model/ on the configured base."""
    from trainer.checkpoint import CheckpointError, verify_manifest
    from trainer.model import BaseModelError, base_fingerprint, resolve_base_path
    from ops.lineage import fingerprint_cache

    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE, MANIFEST) if not (snap / f).is_file()]
    if missing:
        raise PromotionError(f"{snap} is not a complete adapter snapshot (no {', '.join(missing)})")
    try:
        verify_manifest(snap)
        state = json.loads((snap / TRAINER_STATE).read_text(encoding="utf-8"))
    except (CheckpointError, OSError, ValueError) as exc:
        raise PromotionError(f"{snap} is damaged: {exc}") from None
    try:
        base = resolve_base_path(config, layout.home)
    except BaseModelError as exc:
        raise PromotionError(str(exc)) from None
    fp = base_fingerprint(base, fingerprint_cache(layout.home))
    if not state.get("base_fingerprint") or state.get("base_fingerprint") != fp:
        raise PromotionError(f"{snap.name} was trained on base {state.get('base_model')} (fingerprint "
                             f"{str(state.get('base_fingerprint'))[:16]}), but the configured base is {base} "
                             f"(fingerprint {fp[:16]}): an adapter only works on its own base")
    return state


def _same_adapter(a: Path, b: Path) -> bool:
    try:
        ma = json.loads((a / MANIFEST).read_text(encoding="utf-8"))["files"]
        mb = json.loads((b / MANIFEST).read_text(encoding="utf-8"))["files"]
        return all(ma[f]["sha256"] == mb[f]["sha256"] for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def move_to(layout: Layout, name: str, action: str) -> dict[str, Any]:
    """Make snapshots/NAME current_model/ (checked, journalled). PromotionError when refused."""
    home = layout.home
    resolve_snapshot(layout, name)          # a bad name is told first, whatever else is going on
    with consolidation_lock(home) as free:
        if not free:
            raise PromotionError("a consolidation is running in this home; try again when it is done")
        try:
            lock = DaemonLock(layout).acquire(wait_s=0)
        except AlreadyRunning as exc:
            raise PromotionError(f"the daemon is running (pid {exc.pid or 'unknown'}): stop it first "
                                 f"(`trainer-ctl stop`), {action}, then start it again "
                                 "(bin/launch_training_daemon.sh); nothing was moved") from None
        try:
            from trainer import adapter_store

            recover_locked(home)
            recover_promotion(home)
            adapter_store.recover_current_model(home)
            snap = resolve_snapshot(layout, name)
            state = check_snapshot(layout, snap, raw_config(layout))
            if layout.current_model.is_dir() and _same_adapter(snap, layout.current_model):
                return {"unchanged": True, "snapshot": f"snapshots/{snap.name}", "state": state}
            move = switch_current(home, snap, action)
        finally:
            lock.release()
    return {**move, "state": state}


def _lora_note(layout: Layout, state: dict[str, Any]) -> str | None:
    cfg = raw_config(layout)
    rec = recorded_lora(state)
    diffs = [f"{k} {rec[k]!r} (config.json {cfg[k]!r})" for k in LORA_KEYS if k in rec and k in cfg and rec[k] != cfg[k]]
    if not diffs:
        return None
    return ("note: this adapter was made with other LoRA settings than config.json's (" + ", ".join(diffs)
            + "): the next job starts a fresh adapter unless config.json is set back")


def _cmd(layout: Layout, args: argparse.Namespace, action: str) -> int:
    try:
        result = move_to(layout, args.snapshot, action)
    except UnknownSnapshot as exc:
        err(f"{action} refused: {exc}")
        return EXIT_USAGE
    except PromotionError as exc:
        err(f"{action} refused: {exc}")
        return EXIT_FAIL
    state = result["state"]
    names = [d.get("name") for d in state.get("datasets") or []]
    if result.get("unchanged"):
        print(f"{result['snapshot']} is already the adapter in current_model/; nothing was moved")
        return EXIT_OK
    print(f"{'promoted' if action == 'promote' else 'rolled back to'} {result['snapshot']}: current_model/ "
          f"now holds {len(names)} dataset(s) ({', '.join(str(n) for n in names)})\n"
          f"the previous adapter is kept as {result.get('previous') or 'none (there was none)'}")
    note = _lora_note(layout, state)
    if note:
        print(note)
    return EXIT_OK


def cmd_promote(layout: Layout, args: argparse.Namespace) -> int:
    return _cmd(layout, args, "promote")


def cmd_rollback(layout: Layout, args: argparse.Namespace) -> int:
    return _cmd(layout, args, "rollback")
