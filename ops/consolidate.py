"""Consolidation: merge the live adapter into a new base and switch to it (lineage: ops/lineage.py;
on-demand snapshots: ops/snapshot.py).

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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from core.atomic import atomic_write_json, durable_rename, fsync_dir, fsync_tree, give_default_modes
from core.config import base_model_value, set_base_model
from core.lock import AlreadyRunning, DaemonLock, read_pid
from core.paths import Layout, resolve_under
from core.switch import (BACKUP_SUFFIX, CONSOLIDATION_META, ConsolidationError, add_event, consolidation_lock,
                         dataset_entries, ensure_locked_base, journal_path, now_iso, read_config_raw,
                         recover_locked, write_backup_meta)
from ops.lineage import config_value, fingerprint_cache
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


@dataclass
class _Plan:
    """What is merged into what (step 1), checked before anything is written."""
    cur: Path
    state: dict[str, Any]
    base: Path
    fingerprint: str
    datasets: list[dict[str, Any]]
    manifest: dict[str, Any]
    adapter_cfg: dict[str, Any]
    old_value: str | None
    parent_value: str


@dataclass
class _Published:
    """The merged base (steps 2-3): written, verified from disk, published by one rename."""
    final: Path
    fingerprint: str
    probe: dict[str, Any]
    reload_diff: float


def _plan(home: Path, layout: Layout, config: dict[str, Any]) -> _Plan:
    """Step 1: the adapter, the base it was trained on, and what is refused (ConsolidationError)."""
    from trainer import adapter_store
    from trainer.checkpoint import MANIFEST, CheckpointError, verify_manifest
    from trainer.model import BaseModelError, base_fingerprint, resolve_base_path

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
    fingerprint = base_fingerprint(base, fingerprint_cache(home))
    if fingerprint != recorded_fp:
        raise ConsolidationError(
            f"the adapter in current_model/ was trained on base {recorded_base} (fingerprint "
            f"{recorded_fp}), but the configured base is {base} (fingerprint {fingerprint}); "
            f"refusing to merge it into a different base")
    datasets = dataset_entries(state)
    manifest = json.loads((cur / MANIFEST).read_text(encoding="utf-8"))["files"]
    adapter_cfg = json.loads((cur / "adapter_config.json").read_text(encoding="utf-8"))
    old_value = base_model_value(read_config_raw(home))
    if old_value is not None and resolve_under(home, old_value) is not None \
            and resolve_under(home, old_value).resolve() != base:  # type: ignore[union-attr]
        log.warning("config.json names base %r but the given config names %s; config.json "
                    "will name the new base", old_value, base)
    plan = _Plan(cur=cur, state=state, base=base, fingerprint=fingerprint, datasets=datasets,
                 manifest=manifest, adapter_cfg=adapter_cfg, old_value=old_value,
                 parent_value=config_value(base, home))
    log.info("consolidating %s (%d datasets) into %s", cur, len(datasets), base)
    return plan


def _write_meta(tmp: Path, home: Path, plan: _Plan, description: str, probe: dict[str, Any],
                new_fp: str) -> None:
    """``consolidation.json`` of the new base: its parent, the adapter merged, its datasets."""
    cfg, state = plan.adapter_cfg, plan.state
    meta = {
        "kind": "consolidation", "description": description, "created_at": now_iso(),
        "parent": {"path": plan.parent_value, "abs_path": str(plan.base), "fingerprint": plan.fingerprint},
        "adapters": [{"path": config_value(plan.cur, home), "lora": state.get("lora"),
                      "peft_type": cfg.get("peft_type"), "r": cfg.get("r"),
                      "lora_alpha": cfg.get("lora_alpha"),
                      "target_modules": cfg.get("target_modules"),
                      "total_steps": state.get("total_steps"),
                      "files": {k: v.get("sha256") for k, v in plan.manifest.items()},
                      "datasets": plan.datasets}],
        "datasets": plan.datasets,
        "probe": probe,
        "fingerprint": new_fp,
        "dtype": "float32",
    }
    with open(tmp / CONSOLIDATION_META, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def _verify_reload(layout: Layout, tmp: Path, final: Path, inputs: Any, merged_logits: Any,
                   probe_tolerance: float) -> float:
    """The saved model, reloaded from *tmp*, must reproduce the merged probe logits; else it is
    left aside as ``.failed-<name>`` and ConsolidationError is raised. Returns the max |diff|."""
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
    return reload_diff


def _merge_and_publish(home: Path, layout: Layout, plan: _Plan, description: str,
                       probe_tolerance: float) -> _Published:
    """Steps 2-3: merge in full precision, probe before/after; write hidden, fsync, verify from
    disk, publish by one rename."""
    from trainer.model import base_fingerprint

    merged, tokenizer, inputs, merged_logits, probe = merge(plan.base, plan.cur, probe_tolerance)
    _pause_point(home, "merged")
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
        _write_meta(tmp, home, plan, description, probe, new_fp)
        fsync_tree(tmp)
        fsync_dir(layout.consolidated)
        _pause_point(home, "tmp_written")
        reload_diff = _verify_reload(layout, tmp, final, inputs, merged_logits, probe_tolerance)
        durable_rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a .failed-* folder aside is kept
        raise
    _pause_point(home, "published")
    check_fp = base_fingerprint(final, fingerprint_cache(home))  # also warms the cache
    if check_fp != new_fp:
        raise ConsolidationError(f"{final} changed after it was written (fingerprint "
                                 f"{check_fp} != {new_fp}); nothing was switched")
    return _Published(final=final, fingerprint=new_fp, probe=probe, reload_diff=reload_diff)


def _switch(home: Path, layout: Layout, plan: _Plan, pub: _Published, description: str) -> tuple[str, Path]:
    """Step 4: switch to the new base, journalled (see the module docstring). Returns the new
    config.json value and the backup folder of the adapter."""
    new_value = config_value(pub.final, home)
    layout.snapshots.mkdir(parents=True, exist_ok=True)
    backup = _unique(layout.snapshots, f"{pub.final.name}{BACKUP_SUFFIX}")
    journal = {"stage": "switching", "new_base": new_value, "old_base": plan.old_value,
               "new_fingerprint": pub.fingerprint, "old_fingerprint": plan.fingerprint,
               "backup": config_value(backup, home), "description": description,
               "started_at": now_iso(), "pid": os.getpid()}
    layout.status_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(journal_path(home), journal)
    _pause_point(home, "journal_written")
    durable_rename(plan.cur, backup)
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
    return new_value, backup


def consolidate(home: Path, config: dict[str, Any], description: str, *,
                probe_tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Merge current_model/ into a new base, make it the locked base; see the module docstring."""
    home = Path(home).resolve()
    layout = Layout(home)
    t0 = time.monotonic()
    with consolidation_lock(home) as held:
        if not held:
            raise ConsolidationError("another consolidation is running in this home")
        with _daemon_lock(home):
            recover_locked(home)
            plan = _plan(home, layout, config)
            pub = _merge_and_publish(home, layout, plan, description, probe_tolerance)
            new_value, backup = _switch(home, layout, plan, pub, description)

    result = {"new_base": new_value, "new_base_path": str(pub.final), "fingerprint": pub.fingerprint,
              "parent_base": plan.parent_value, "parent_fingerprint": plan.fingerprint,
              "backup": str(backup), "probe_max_abs_diff": pub.probe["max_abs_diff"],
              "probe_tolerance": probe_tolerance,
              "adapter_effect_max_abs": pub.probe["adapter_effect_max_abs"],
              "reload_max_abs_diff": pub.reload_diff, "datasets": plan.datasets,
              "description": description, "seconds": round(time.monotonic() - t0, 3)}
    add_event(home, "consolidated",
              f"consolidated {len(plan.datasets)} dataset(s) into new base {new_value} "
              f"(probe max |diff| {pub.probe['max_abs_diff']:.2g}); adapter backed up to "
              f"{config_value(backup, home)}: {description}", data=result)
    log.info("consolidated into %s (fingerprint %s) in %.1fs", pub.final, pub.fingerprint[:16], result["seconds"])
    return result
