"""Consolidation (merge the live adapter into a new base), lineage, on-demand snapshots.

``consolidate(home, config, description)``:

1. recover an interrupted consolidation; refuse without a current_model/, with a base whose
   fingerprint is not the one the adapter records, with a job mid-way (its checkpoints belong
   to the old base), or while a daemon runs (it could swap current_model/ under us).
2. Merge: the base in float32 on CPU (not 4-bit), ``PeftModel.from_pretrained`` with the
   adapter, probe logits (fixed short texts, ``use_cache=False``) of base+adapter, then
   ``merge_and_unload`` and the same probe again: max |diff| must be <= ``probe_tolerance``.
3. Publish: model (safetensors) + tokenizer + ``consolidation.json`` into the hidden
   ``consolidated_models/.tmp-<ts>/``, every file and dir fsynced, then reloaded from there and
   checked to reproduce the merged probe logits; only then one durable rename to
   ``consolidated_models/<ts>/``. A non-hidden folder there is therefore always complete and
   verified; a failed verification leaves ``.failed-<ts>`` aside.
4. Switch, journalled in ``status/consolidation.json`` (the journal):
   a. journal ``{"stage": "switching", "new_base", "old_base", "backup", ...}`` (atomic);
   b. rename ``current_model/`` -> ``snapshots/<ts>__pre-consolidation/`` (one rename);
   c. config.json: ``base_model`` = the new folder (every other key kept; atomic);
   d. state.db: locked ``base_model`` = the new value (unlock + record_locked), an event;
   e. ``snapshot.json`` into the backup; f. remove the journal.
   The commit point is (c): ``recover_consolidation`` rolls back (adapter back to
   current_model/) while config.json names the old base, and rolls forward (finishes b, d, e)
   once it names the new one. So a SIGKILL anywhere leaves the old state or the new state.

``recover_consolidation`` also removes ``consolidated_models/.tmp-*`` leftovers. It never
deletes a non-hidden base folder: no base is ever deleted (a rolled-back consolidation leaves
its complete, verified folder unused).

Exclusion: ``status/.consolidation.lock`` (flock) serialises consolidate/recover; consolidate
also holds the daemon lock (see core/lock.py) while it runs, so no daemon starts (or trains) mid-way.
Called from inside the daemon process itself (``.daemon.pid`` is our pid) the daemon lock is
the caller's already, and the caller must not train at the same time.

Test hook: ``TRAINER_CONSOLIDATE_PAUSE_AT=<stage>`` makes consolidate write a marker file
(``TRAINER_CONSOLIDATE_PAUSE_MARKER`` or ``<home>/.consolidate-paused``) and sleep at that
stage, so a test can SIGKILL it exactly there. Stages: see ``PAUSE_STAGES``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from core.atomic import (atomic_write_json, durable_rename, fsync_dir, fsync_tree, give_default_modes,
                         read_json)
from core.config import base_model_value, set_base_model
from core.diskfull import is_disk_full
from core.lock import AlreadyRunning, DaemonLock, read_pid
from core.paths import Layout
from core.switch import (  # noqa: F401 (re-exported)
    BACKUP_SUFFIX,
    CONSOLIDATION_META,
    JOURNAL_NAME,
    LOCK_NAME,
    ConsolidationError,
    add_event,
    consolidation_lock,
    dataset_entries,
    ensure_locked_base,
    flock_nb,
    journal_path,
    now_iso,
    read_config_raw,
    recover_consolidation,
    recover_locked,
    resolve_path,
    roll_back,
    roll_forward,
    write_backup_meta,
)
from trainer.merge import load_full_precision, max_diff, merge, probe as probe_logits

log = logging.getLogger("ops.consolidate")

PAUSE_ENV = "TRAINER_CONSOLIDATE_PAUSE_AT"
PAUSE_MARKER_ENV = "TRAINER_CONSOLIDATE_PAUSE_MARKER"
PAUSE_STAGES = ("merged", "tmp_written", "published", "journal_written", "current_moved",
                "config_written", "db_updated")
DEFAULT_TOLERANCE = 1e-4



# ============================================================================ small helpers

def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d_%H%M%S")


def _unique(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3 ... if taken (hidden variants count as taken too)."""
    cand, n = parent / name, 2
    while cand.exists() or (parent / f".tmp-{cand.name}").exists() or (parent / f".failed-{cand.name}").exists():
        cand = parent / f"{name}-{n}"
        n += 1
    return cand


def _config_value(path: Path, home: Path) -> str:
    """How config.json names *path*: relative to home when under it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(home).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _pause_point(home: Path, stage: str) -> None:
    """Test hook: at the stage named by $TRAINER_CONSOLIDATE_PAUSE_AT, mark and sleep (to be killed)."""
    if os.environ.get(PAUSE_ENV) != stage:
        return
    marker = Path(os.environ.get(PAUSE_MARKER_ENV) or (Path(home) / ".consolidate-paused"))
    marker.write_text(f"{stage} {os.getpid()}\n", encoding="utf-8")
    log.warning("paused at stage %s (test hook %s); waiting to be killed", stage, PAUSE_ENV)
    while True:
        time.sleep(3600)


@contextmanager
def _daemon_lock(home: Path) -> Iterator[bool]:
    """Hold the daemon lock if free. Yields True when held (no daemon runs), False when we are
    the daemon itself; raises ConsolidationError when another process (a daemon) holds it."""
    layout = Layout(Path(home))
    if read_pid(layout) == os.getpid():
        yield False
        return
    try:
        lock = DaemonLock(layout).acquire(wait_s=0)
    except AlreadyRunning as exc:
        raise ConsolidationError(
            f"the daemon is running (pid {exc.pid if exc.pid else 'unknown'}): "
            f"stop it first (`trainer-ctl stop`), then consolidate") from None
    try:
        yield True
    finally:
        lock.release()


def _daemon_lock_free(home: Path) -> int | None:
    """The daemon lock's fd if no other process holds it (caller closes it), else None."""
    try:
        return DaemonLock(Layout(Path(home))).acquire(wait_s=0).fd
    except AlreadyRunning:
        return None


def _fingerprint_cache(home: Path) -> Path:
    from trainer.model import FINGERPRINT_CACHE_NAME

    return Layout(Path(home)).checkpoints / FINGERPRINT_CACHE_NAME


# ============================================================================ snapshots

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


# ============================================================================ recovery

# ============================================================================ consolidate

def _refuse_midway_jobs(layout: Layout) -> None:
    ckroot = layout.checkpoints
    if not ckroot.is_dir():
        return
    busy = sorted(p.name for p in ckroot.glob("job-*") if p.is_dir() and any(p.glob("step-*")))
    if busy:
        raise ConsolidationError(
            f"a job is part-way trained on the current base ({', '.join(busy)} in {ckroot}): its "
            f"checkpoints cannot continue on a new base. Let it finish (or remove its checkpoints) "
            f"before consolidating")


def consolidate(home: Path, config: dict[str, Any], description: str, *,
                probe_tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Merge current_model/ into a new base, make it the locked base; see the module docstring."""
    from trainer import adapter_store
    from trainer.checkpoint import MANIFEST, CheckpointError, verify_manifest
    from trainer.model import BaseModelError, base_fingerprint, resolve_base_path

    home = Path(home).resolve()
    layout = Layout(home)
    t0 = time.monotonic()
    with consolidation_lock(home) as held:
        if not held:
            raise ConsolidationError("another consolidation is running in this home")
        with _daemon_lock(home):
            recover_locked(home)

            # ---- 1. what is merged into what
            cur, state = adapter_store.read_current(home)
            if cur is None or not (cur / "adapter_model.safetensors").is_file():
                raise ConsolidationError(f"nothing to consolidate: {layout.current_model} does not exist "
                                         f"or holds no adapter (train a dataset first)")
            try:
                verify_manifest(cur)
            except CheckpointError as exc:
                raise ConsolidationError(f"current_model/ is damaged: {exc}") from None
            _refuse_midway_jobs(layout)
            try:
                base = resolve_base_path(config, home)
            except BaseModelError as exc:
                raise ConsolidationError(str(exc)) from None
            recorded_fp, recorded_base = state.get("base_fingerprint"), state.get("base_model")
            if not recorded_fp:
                raise ConsolidationError(f"{cur}/trainer_state.json does not record its base fingerprint")
            fingerprint = base_fingerprint(base, _fingerprint_cache(home))
            if fingerprint != recorded_fp:
                raise ConsolidationError(
                    f"the adapter in current_model/ was trained on base {recorded_base} (fingerprint "
                    f"{recorded_fp}), but the configured base is {base} (fingerprint {fingerprint}); "
                    f"refusing to merge it into a different base")
            datasets = dataset_entries(state)
            manifest = json.loads((cur / MANIFEST).read_text(encoding="utf-8"))["files"]
            adapter_cfg = json.loads((cur / "adapter_config.json").read_text(encoding="utf-8"))
            old_value = base_model_value(read_config_raw(home))
            if old_value is not None and resolve_path(home, old_value) is not None \
                    and resolve_path(home, old_value).resolve() != base:  # type: ignore[union-attr]
                log.warning("config.json names base %r but the given config names %s; config.json "
                            "will name the new base", old_value, base)
            parent_value = _config_value(base, home)
            log.info("consolidating %s (%d datasets) into %s", cur, len(datasets), base)

            # ---- 2. merge in full precision, probe before/after
            merged, tokenizer, inputs, merged_logits, probe = merge(base, cur, probe_tolerance)
            _pause_point(home, "merged")

            # ---- 3. write hidden, fsync, verify from disk, publish by one rename
            layout.consolidated.mkdir(parents=True, exist_ok=True)
            final = _unique(layout.consolidated, _stamp())
            tmp = layout.consolidated / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                merged.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                give_default_modes(tmp)
                del merged
                new_fp = base_fingerprint(tmp, None)
                meta = {
                    "kind": "consolidation", "description": description, "created_at": now_iso(),
                    "parent": {"path": parent_value, "abs_path": str(base), "fingerprint": fingerprint},
                    "adapters": [{"path": _config_value(cur, home), "lora": state.get("lora"),
                                  "peft_type": adapter_cfg.get("peft_type"), "r": adapter_cfg.get("r"),
                                  "lora_alpha": adapter_cfg.get("lora_alpha"),
                                  "target_modules": adapter_cfg.get("target_modules"),
                                  "total_steps": state.get("total_steps"),
                                  "files": {k: v.get("sha256") for k, v in manifest.items()},
                                  "datasets": datasets}],
                    "datasets": datasets,
                    "probe": probe,
                    "fingerprint": new_fp,
                    "dtype": "float32",
                }
                with open(tmp / CONSOLIDATION_META, "w", encoding="utf-8") as fh:
                    fh.write(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
                fsync_tree(tmp)
                fsync_dir(layout.consolidated)
                _pause_point(home, "tmp_written")
                try:
                    reloaded = load_full_precision(tmp)
                    reload_diff = max_diff(merged_logits, probe_logits(reloaded, inputs))
                    del reloaded
                except Exception as exc:  # noqa: BLE001 - any failure to reload is a failed verification
                    reload_diff, reload_exc = float("nan"), exc
                else:
                    reload_exc = None
                if reload_exc is not None or not reload_diff <= probe_tolerance:
                    aside = layout.consolidated / f".failed-{final.name}"
                    durable_rename(tmp, aside)
                    why = f"does not load: {reload_exc!r}" if reload_exc is not None else \
                        f"reproduces the merged probe logits only to {reload_diff:.3g} > {probe_tolerance:.3g}"
                    raise ConsolidationError(f"the saved merged model {why}; left aside in {aside}; "
                                             f"nothing was changed")
                durable_rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a .failed-* folder aside is kept
                raise
            _pause_point(home, "published")
            check_fp = base_fingerprint(final, _fingerprint_cache(home))  # also warms the cache
            if check_fp != new_fp:
                raise ConsolidationError(f"{final} changed after it was written (fingerprint "
                                         f"{check_fp} != {new_fp}); nothing was switched")
            new_value = _config_value(final, home)

            # ---- 4. switch, journalled
            layout.snapshots.mkdir(parents=True, exist_ok=True)
            backup = _unique(layout.snapshots, f"{final.name}{BACKUP_SUFFIX}")
            journal = {"stage": "switching", "new_base": new_value, "old_base": old_value,
                       "new_fingerprint": new_fp, "old_fingerprint": fingerprint,
                       "backup": _config_value(backup, home), "description": description,
                       "started_at": now_iso(), "pid": os.getpid()}
            layout.status_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(journal_path(home), journal)
            _pause_point(home, "journal_written")
            durable_rename(cur, backup)
            _pause_point(home, "current_moved")
            raw = read_config_raw(home)
            set_base_model(raw, new_value)                     # where it takes effect (preset)
            atomic_write_json(layout.config, raw)              # the commit point
            _pause_point(home, "config_written")
            ensure_locked_base(home, new_value)
            _pause_point(home, "db_updated")
            write_backup_meta(backup, journal)
            journal_path(home).unlink()
            fsync_dir(layout.status_dir)

    result = {"new_base": new_value, "new_base_path": str(final), "fingerprint": new_fp,
              "parent_base": parent_value, "parent_fingerprint": fingerprint,
              "backup": str(backup), "probe_max_abs_diff": probe["max_abs_diff"],
              "probe_tolerance": probe_tolerance,
              "adapter_effect_max_abs": probe["adapter_effect_max_abs"],
              "reload_max_abs_diff": reload_diff, "datasets": datasets,
              "description": description, "seconds": round(time.monotonic() - t0, 3)}
    add_event(home, "consolidated",
               f"consolidated {len(datasets)} dataset(s) into new base {new_value} "
               f"(probe max |diff| {probe['max_abs_diff']:.2g}); adapter backed up to "
               f"{_config_value(backup, home)}: {description}", data=result)
    log.info("consolidated into %s (fingerprint %s) in %.1fs", final, new_fp[:16], result["seconds"])
    return result


# ============================================================================ lineage

def lineage(home: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Newest first: the live adapter (if any), then the configured base and its ancestors.

    Each base entry: kind ("consolidated" | "root"), path, fingerprint, description, created_at,
    exists, and for consolidated bases the adapters and datasets merged into it (with sha256).
    """
    home = Path(home)
    layout = Layout(home)
    out: list[dict[str, Any]] = []
    cur = layout.current_model
    state = read_json(cur / "trainer_state.json", None) if (cur / "adapter_config.json").is_file() else None
    if isinstance(state, dict):
        out.append({"kind": "adapter", "path": _config_value(cur, home),
                    "base_model": state.get("base_model"), "fingerprint": None,
                    "base_fingerprint": state.get("base_fingerprint"),
                    "description": "live adapter (current_model/)",
                    "created_at": state.get("updated_at"), "total_steps": state.get("total_steps"),
                    "datasets": dataset_entries(state)})

    raw = config.get("base_model")
    path = resolve_path(home, raw)
    known_fp: str | None = None
    seen: set[str] = set()
    while path is not None:
        key = str(path.resolve()) if path.exists() else str(path)
        if key in seen or len(seen) > 1000:
            log.warning("lineage: cycle at %s", path)
            break
        seen.add(key)
        meta = read_json(path / CONSOLIDATION_META, None) if path.is_dir() else None
        entry: dict[str, Any] = {"path": _config_value(path, home) if path.exists() else str(path),
                                 "exists": path.is_dir()}
        if isinstance(meta, dict):
            entry.update(kind="consolidated", fingerprint=meta.get("fingerprint"),
                         description=meta.get("description"), created_at=meta.get("created_at"),
                         adapters=meta.get("adapters") or [], datasets=meta.get("datasets") or [],
                         probe=meta.get("probe"))
            out.append(entry)
            parent = meta.get("parent") or {}
            known_fp = parent.get("fingerprint")
            path = resolve_path(home, parent.get("path")) or resolve_path(home, parent.get("abs_path"))
            if path is not None and not path.exists() and parent.get("abs_path"):
                path = Path(parent["abs_path"])
            continue
        fp = known_fp
        if fp is None and path.is_dir():
            try:
                from trainer.model import base_fingerprint
                fp = base_fingerprint(path, _fingerprint_cache(home))
            except OSError as exc:
                log.warning("lineage: cannot fingerprint %s: %s", path, exc)
        info = read_json(path / "base.json", None) if path.is_dir() else None
        desc = f"root base ({info.get('kind')})" if isinstance(info, dict) and info.get("kind") else "root base"
        entry.update(kind="root", fingerprint=fp, description=desc,
                     created_at=info.get("created_at") if isinstance(info, dict) else None,
                     adapters=[], datasets=[])
        out.append(entry)
        break
    return out
