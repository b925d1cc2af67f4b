"""On-demand snapshots: copy the live adapter (current_model/) to snapshots/, safe while the
daemon runs (the copy is checked against current_model/'s manifest, and retried when a job
swapped current_model/ meanwhile)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from core.diskfull import is_disk_full
from core.lock import AlreadyRunning, DaemonLock
from core.paths import Layout
from core.switch import ConsolidationError, dataset_entries, now_iso

log = logging.getLogger("ops.consolidate")  # the name its log lines have always had


def _daemon_lock_free(home: Path) -> int | None:
    """The daemon lock's fd if no other process holds it (caller closes it), else None."""
    try:
        return DaemonLock(Layout(Path(home))).acquire(wait_s=0).fd
    except AlreadyRunning:
        return None



def _copy_current_verified(cur: Path, dest: Path) -> dict[str, Any]:
    """Copy current_model/'s files into *dest*, checked against the manifest read first (so a
    concurrent swap by the daemon cannot give a mix of two adapters). Returns trainer_state."""
    from trainer.checkpoint import MANIFEST, CheckpointError, sha256_file, verify_manifest

    manifest = json.loads((cur / MANIFEST).read_text(encoding="utf-8"))["files"]
    dest.mkdir(parents=True)
    for name in sorted(manifest):
        shutil.copy2(cur / name, dest / name)
    for name, meta in manifest.items():
        if sha256_file(dest / name) != meta.get("sha256"):
            raise CheckpointError(f"{name} changed while copying")
    shutil.copy2(cur / MANIFEST, dest / MANIFEST)
    verify_manifest(dest)
    from trainer.adapter_store import TRAINER_STATE
    try:
        return json.loads((dest / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def snapshot_now(home: Path, description: str) -> Path:
    """Copy current_model/ to snapshots/<YYYYmmdd_HHMMSS>__manual/ with snapshot.json.

    Safe while the daemon runs: the copy is checked against current_model/'s manifest and
    retried if a job swapped current_model/ meanwhile. ConsolidationError without an adapter.
    """
    from trainer import adapter_store
    from trainer.checkpoint import CheckpointError

    home = Path(home)
    layout = Layout(home)
    lock_fd = _daemon_lock_free(home)
    no_daemon = lock_fd is not None
    if lock_fd is not None:  # no daemon: finishing an interrupted swap is ours to do
        try:
            adapter_store.recover_current_model(home)
        finally:
            os.close(lock_fd)  # held only for the recovery: a daemon may start during the copy
    layout.snapshots.mkdir(parents=True, exist_ok=True)
    last_exc: Exception | None = None
    for attempt in range(20):
        cur = layout.current_model
        if not (cur / "adapter_config.json").is_file():
            if no_daemon or attempt >= 5:
                break
            time.sleep(0.2)  # the daemon may be between the two renames of a swap
            continue
        private = layout.snapshots / f".copy-manual-{os.getpid()}-{attempt}"
        shutil.rmtree(private, ignore_errors=True)
        try:
            state = _copy_current_verified(cur, private)
            meta = {"kind": "manual", "description": description,
                    "base_model": state.get("base_model"),
                    "base_fingerprint": state.get("base_fingerprint"),
                    "datasets": dataset_entries(state),
                    "total_steps": state.get("total_steps"),
                    "source": str(cur), "snapshot_time": now_iso()}
            snap = adapter_store.write_snapshot(home, "manual", private, meta)
        except adapter_store.NonFiniteAdapter as exc:   # not a race: no retry makes it finite
            raise ConsolidationError(f"{cur}: {exc}") from exc
        except (OSError, ValueError, KeyError, CheckpointError) as exc:
            if is_disk_full(exc):          # not a race: waiting does not make room
                raise
            last_exc = exc
            log.info("snapshot copy raced with a current_model/ swap (%s); retrying", exc)
            time.sleep(0.1)
            continue
        finally:
            shutil.rmtree(private, ignore_errors=True)
        log.info("manual snapshot %s (%d datasets): %s", snap, len(meta["datasets"]), description)
        return snap
    if last_exc is not None:
        raise ConsolidationError(f"could not copy {cur} consistently: {last_exc}")
    raise ConsolidationError(f"no adapter to snapshot: {layout.current_model} does not exist "
                             f"(train a dataset first)")

