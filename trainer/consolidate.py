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
also holds the daemon lock (see daemon/lock.py) while it runs, so no daemon starts (or trains) mid-way.
Called from inside the daemon process itself (``.daemon.pid`` is our pid) the daemon lock is
the caller's already, and the caller must not train at the same time.

Test hook: ``TRAINER_CONSOLIDATE_PAUSE_AT=<stage>`` makes consolidate write a marker file
(``TRAINER_CONSOLIDATE_PAUSE_MARKER`` or ``<home>/.consolidate-paused``) and sleep at that
stage, so a test can SIGKILL it exactly there. Stages: see ``PAUSE_STAGES``.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from daemon.atomic import atomic_write_json, durable_rename, fsync_dir, fsync_tree, give_default_modes, read_json
from daemon.config import base_model_value, locked_namespace, set_base_model
from daemon.diskfull import is_disk_full
from daemon.lock import AlreadyRunning, DaemonLock, read_pid
from daemon.paths import Layout

log = logging.getLogger("trainer.consolidate")

CONSOLIDATION_META = "consolidation.json"
JOURNAL_NAME = "consolidation.json"          # under status/
LOCK_NAME = ".consolidation.lock"            # under status/
BACKUP_SUFFIX = "__pre-consolidation"
PAUSE_ENV = "TRAINER_CONSOLIDATE_PAUSE_AT"
PAUSE_MARKER_ENV = "TRAINER_CONSOLIDATE_PAUSE_MARKER"
PAUSE_STAGES = ("merged", "tmp_written", "published", "journal_written", "current_moved",
                "config_written", "db_updated")
DEFAULT_TOLERANCE = 1e-4

# A fixed probe batch: short plain and chat-shaped texts, each run on its own (no padding).
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nWhat is 12 plus 7?<|im_end|>\n<|im_start|>assistant\n19<|im_end|>\n",
    "Once upon a time, in a small village by the sea, there lived",
    "def add(a, b):\n    return a + b\n",
)


class ConsolidationError(RuntimeError):
    """Consolidation refused or failed; the message says why (state is left as it was)."""


# ============================================================================ small helpers

def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d_%H%M%S")


def _unique(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3 ... if taken (hidden variants count as taken too)."""
    cand, n = parent / name, 2
    while cand.exists() or (parent / f".tmp-{cand.name}").exists() or (parent / f".failed-{cand.name}").exists():
        cand = parent / f"{name}-{n}"
        n += 1
    return cand


def _resolve(home: Path, raw: str | os.PathLike[str] | None) -> Path | None:
    if not raw:
        return None
    p = Path(raw).expanduser()
    return p if p.is_absolute() else Path(home) / p


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


def _flock(path: Path) -> int | None:
    """A non-blocking exclusive flock on *path*: the fd, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


@contextmanager
def _consolidation_lock(home: Path) -> Iterator[bool]:
    """Hold status/.consolidation.lock; yields False (holding nothing) if another process has it."""
    fd = _flock(Layout(Path(home)).status_dir / LOCK_NAME)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


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


def _read_config_raw(home: Path) -> dict[str, Any]:
    path = Layout(Path(home)).config
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ConsolidationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConsolidationError(f"{path} must hold a JSON object")
    return raw


def _fingerprint_cache(home: Path) -> Path:
    from trainer.model import FINGERPRINT_CACHE_NAME

    return Layout(Path(home)).checkpoints / FINGERPRINT_CACHE_NAME


def _dataset_entries(state: dict[str, Any]) -> list[dict[str, Any]]:
    keep = ("name", "sha256", "job_id", "steps", "final_loss", "eval_loss", "examples",
            "trained_tokens", "completed_at")
    return [{k: d.get(k) for k in keep if k in d} for d in (state.get("datasets") or [])
            if isinstance(d, dict)]


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
                    "datasets": _dataset_entries(state),
                    "total_steps": state.get("total_steps"),
                    "source": str(cur), "snapshot_time": _now_iso()}
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

def _journal_path(home: Path) -> Path:
    return Layout(Path(home)).status_dir / JOURNAL_NAME


def _ensure_locked_base(home: Path, value: str) -> bool:
    """state.db's locked base_model = *value*; True if it had to change."""
    from daemon.statedb import StateDB

    ns = locked_namespace(_read_config_raw(home))
    db = StateDB(Layout(Path(home)).state_db)
    try:
        if db.locked(ns).get("base_model") == value:
            return False
        db.unlock("base_model", ns)
        db.record_locked({"base_model": value}, ns)
        return True
    finally:
        db.close()


def _add_event(home: Path, kind: str, message: str, data: dict[str, Any] | None = None,
               level: str = "info") -> None:
    from daemon.statedb import StateDB

    try:
        db = StateDB(Layout(Path(home)).state_db)
        try:
            db.add_event(kind, message, level=level, data=data)
        finally:
            db.close()
    except Exception as exc:  # noqa: BLE001 - an event is a courtesy, never a failure
        log.warning("could not record event %s: %s", kind, exc)


def _write_backup_meta(backup: Path, journal: dict[str, Any]) -> None:
    from trainer.adapter_store import SNAPSHOT_META, TRAINER_STATE

    if not backup.is_dir() or (backup / SNAPSHOT_META).is_file():
        return
    state = read_json(backup / TRAINER_STATE, {}) or {}
    atomic_write_json(backup / SNAPSHOT_META, {
        "kind": "pre-consolidation", "description": journal.get("description"),
        "consolidated_into": journal.get("new_base"),
        "consolidated_fingerprint": journal.get("new_fingerprint"),
        "base_model": state.get("base_model"), "base_fingerprint": state.get("base_fingerprint"),
        "datasets": _dataset_entries(state), "total_steps": state.get("total_steps"),
        "created_at": journal.get("started_at") or _now_iso()})


def _roll_forward(home: Path, journal: dict[str, Any]) -> None:
    """config.json names the new base: finish steps b, d, e of the switch."""
    layout = Layout(Path(home))
    backup = _resolve(home, journal["backup"])
    assert backup is not None
    cur = layout.current_model
    if cur.exists() and not backup.exists():
        durable_rename(cur, backup)
    elif cur.exists():
        # Cannot happen through consolidate (b precedes c); a newer adapter is kept, never lost.
        log.warning("roll forward: both %s and %s exist; keeping both", cur, backup)
    _ensure_locked_base(home, journal["new_base"])
    _write_backup_meta(backup, journal)


def _roll_back(home: Path, journal: dict[str, Any]) -> None:
    """config.json still names the old base: the adapter goes back to current_model/."""
    layout = Layout(Path(home))
    backup = _resolve(home, journal["backup"])
    assert backup is not None
    if not layout.current_model.exists() and backup.is_dir():
        durable_rename(backup, layout.current_model)


def _recover_locked(home: Path) -> str | None:
    layout = Layout(Path(home))
    actions: list[str] = []
    jpath = _journal_path(home)
    journal = read_json(jpath) if jpath.exists() else None
    if jpath.exists() and not isinstance(journal, dict):
        journal = None
        log.error("unreadable consolidation journal %s: left in place for a human", jpath)
    if journal is not None:
        current = base_model_value(_read_config_raw(home))
        if current == journal.get("new_base"):
            _roll_forward(home, journal)
            actions.append("rolled_forward")
        else:
            if current != journal.get("old_base"):
                log.warning("config.json names %r, neither the old (%r) nor the new (%r) base of the "
                            "interrupted consolidation; restoring the adapter",
                            current, journal.get("old_base"), journal.get("new_base"))
            _roll_back(home, journal)
            actions.append("rolled_back")
        jpath.unlink()
        fsync_dir(jpath.parent)
    if layout.consolidated.is_dir():
        for p in sorted(layout.consolidated.glob(".tmp-*")):
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed {p.name}")
        if any(a.startswith("removed") for a in actions):
            fsync_dir(layout.consolidated)
    if not actions:
        return None
    what = ", ".join(actions)
    log.warning("consolidation recovery: %s", what)
    if journal is not None:
        _add_event(home, "consolidation_recovered",
                   f"interrupted consolidation {actions[0].replace('_', ' ')}: new base "
                   f"{journal.get('new_base')}, old base {journal.get('old_base')}",
                   data={"actions": actions, "journal": journal}, level="warning")
    return what


def recover_consolidation(home: Path) -> str | None:
    """Finish or undo an interrupted consolidation; what was done, or None if nothing was.

    Returns None too (with a log line) when another process is consolidating right now.
    """
    home = Path(home)
    with _consolidation_lock(home) as held:
        if not held:
            log.info("a consolidation is in progress in another process; recovery skipped")
            return None
        return _recover_locked(home)


# ============================================================================ merge

def _probe_inputs(tokenizer: Any) -> list[Any]:
    import torch

    out = []
    for text in PROBE_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:64]
        if ids:
            out.append(torch.tensor([ids], dtype=torch.long))
    if not out:
        raise ConsolidationError("the base's tokenizer produced no tokens for the probe texts")
    return out


def _probe(model: Any, inputs: list[Any]) -> list[Any]:
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=x, use_cache=False).logits.detach().float().clone() for x in inputs]


def _max_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _load_full_precision(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    model.to("cpu")
    model.eval()
    return model


def _check_adapter_loaded(peft_model: Any, adapter_dir: Path) -> None:
    """The adapter's weights in the model are exactly those in the file (nothing silently missing)."""
    import torch
    from safetensors.torch import load_file

    from trainer.model import adapter_state_dict

    on_disk = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = adapter_state_dict(peft_model)
    if set(on_disk) != set(loaded):
        missing = sorted(set(on_disk) ^ set(loaded))[:5]
        raise ConsolidationError(f"adapter {adapter_dir} does not fit the base: keys differ ({missing})")
    for k, v in on_disk.items():
        if not torch.equal(v.float(), loaded[k].float()):
            raise ConsolidationError(f"adapter weight {k} did not load as saved")


def _merge(base: Path, adapter_dir: Path, tolerance: float) -> tuple[Any, Any, list[Any], list[Any], dict[str, float]]:
    """(merged model, tokenizer, probe inputs, merged probe logits, probe numbers)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    inputs = _probe_inputs(tokenizer)
    model = _load_full_precision(base)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    _check_adapter_loaded(peft_model, adapter_dir)
    with peft_model.disable_adapter():
        base_logits = _probe(peft_model, inputs)
    unmerged = _probe(peft_model, inputs)
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged_logits = _probe(merged, inputs)
    diff = _max_diff(unmerged, merged_logits)
    effect = _max_diff(base_logits, unmerged)
    numbers = {"max_abs_diff": diff, "tolerance": tolerance, "adapter_effect_max_abs": effect,
               "texts": len(inputs), "tokens": int(sum(x.numel() for x in inputs))}
    log.info("probe: merged vs base+adapter max |diff| %.3g (tolerance %.3g); adapter effect %.3g",
             diff, tolerance, effect)
    if not diff <= tolerance:  # also catches NaN
        raise ConsolidationError(f"merged model does not reproduce base+adapter: probe max |diff| "
                                 f"{diff:.3g} > tolerance {tolerance:.3g}; nothing was changed")
    return merged, tokenizer, inputs, merged_logits, numbers


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
    with _consolidation_lock(home) as held:
        if not held:
            raise ConsolidationError("another consolidation is running in this home")
        with _daemon_lock(home):
            _recover_locked(home)

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
            datasets = _dataset_entries(state)
            manifest = json.loads((cur / MANIFEST).read_text(encoding="utf-8"))["files"]
            adapter_cfg = json.loads((cur / "adapter_config.json").read_text(encoding="utf-8"))
            old_value = base_model_value(_read_config_raw(home))
            if old_value is not None and _resolve(home, old_value) is not None \
                    and _resolve(home, old_value).resolve() != base:  # type: ignore[union-attr]
                log.warning("config.json names base %r but the given config names %s; config.json "
                            "will name the new base", old_value, base)
            parent_value = _config_value(base, home)
            log.info("consolidating %s (%d datasets) into %s", cur, len(datasets), base)

            # ---- 2. merge in full precision, probe before/after
            merged, tokenizer, inputs, merged_logits, probe = _merge(base, cur, probe_tolerance)
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
                    "kind": "consolidation", "description": description, "created_at": _now_iso(),
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
                    reloaded = _load_full_precision(tmp)
                    reload_diff = _max_diff(merged_logits, _probe(reloaded, inputs))
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
                       "started_at": _now_iso(), "pid": os.getpid()}
            layout.status_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(_journal_path(home), journal)
            _pause_point(home, "journal_written")
            durable_rename(cur, backup)
            _pause_point(home, "current_moved")
            raw = _read_config_raw(home)
            set_base_model(raw, new_value)                     # where it takes effect (preset)
            atomic_write_json(layout.config, raw)              # the commit point
            _pause_point(home, "config_written")
            _ensure_locked_base(home, new_value)
            _pause_point(home, "db_updated")
            _write_backup_meta(backup, journal)
            _journal_path(home).unlink()
            fsync_dir(layout.status_dir)

    result = {"new_base": new_value, "new_base_path": str(final), "fingerprint": new_fp,
              "parent_base": parent_value, "parent_fingerprint": fingerprint,
              "backup": str(backup), "probe_max_abs_diff": probe["max_abs_diff"],
              "probe_tolerance": probe_tolerance,
              "adapter_effect_max_abs": probe["adapter_effect_max_abs"],
              "reload_max_abs_diff": reload_diff, "datasets": datasets,
              "description": description, "seconds": round(time.monotonic() - t0, 3)}
    _add_event(home, "consolidated",
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
                    "datasets": _dataset_entries(state)})

    raw = config.get("base_model")
    path = _resolve(home, raw)
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
            path = _resolve(home, parent.get("path")) or _resolve(home, parent.get("abs_path"))
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
