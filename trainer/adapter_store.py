"""The live adapter (home/current_model/) and its snapshots (home/snapshots/).

current_model/ holds a peft adapter (adapter_config.json, adapter_model.safetensors), a
``trainer_state.json`` (base path + fingerprint, datasets trained in order, total steps) and a
``manifest.json`` (sha256 of each file). It changes only when a job completes, by a swap:

1. write the new adapter into ``current_model.new/`` (files fsynced, manifest last, dir fsynced);
2. rename ``current_model/`` -> ``current_model.old/`` (if it exists); fsync home;
3. rename ``current_model.new/`` -> ``current_model/``; fsync home;
4. remove ``current_model.old/``; fsync home.

Recovery (``recover_current_model``, run before anything reads current_model/):
- current_model/ present: it is valid (steps 2-3 only ever leave a complete one in place); any
  ``.new`` (crash in 1, or after 1 before 2: the job had not completed yet) and any ``.old``
  (crash after 3) are removed.
- current_model/ absent, ``.new`` complete (its manifest verifies): the crash hit between 2 and 3
  (or between 1 and 3 on the very first publish): roll forward, ``.new`` becomes current.
- current_model/ absent, ``.new`` missing or incomplete, ``.old`` present: roll back.
- none of them: no adapter yet (a job starts a fresh LoRA).

Snapshots are written the same way (temp dir, manifest, rename) as
``snapshots/<YYYYmmdd_HHMMSS>__<dataset stem>/`` with ``snapshot.json``, without current_model/'s
AdamW state (``optimizer.pt``, twice the adapter's size): a snapshot is an adapter, and a job that
continues a restored one starts a fresh AdamW (trainer/continuity.py).

Neither is ever made from an adapter holding a NaN or an infinity: the written temp dir's
``adapter_model.safetensors`` is checked before its manifest and the rename; a bad one is removed
and ``NonFiniteAdapter`` raised, so current_model/ and snapshots/ stay what they were.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from core.artifacts import (ADAPTER_WEIGHTS, OPTIMIZER_STATE, SNAPSHOT_META, TRAINER_STATE,  # noqa: F401
                            fill_dir, is_complete, publish_dir)
from core.atomic import fsync_dir

log = logging.getLogger(__name__)



class NonFiniteAdapter(ValueError):
    """An adapter holding NaN/inf values: never published, never snapshotted."""


def nonfinite_tensors(tensors: Any) -> list[tuple[str, int]]:
    """(name, count of non-finite values) for each tensor of *tensors* (name -> tensor) that has any."""
    import torch

    bad = []
    for name, t in tensors:
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append((name, n))
    return bad


def describe_nonfinite(bad: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in bad)
    shown = ", ".join(f"{name} ({n})" for name, n in bad[:3])
    more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
    return f"{total} non-finite values (NaN/inf) in {len(bad)} tensors: {shown}{more}"


def check_finite(directory: Path) -> None:
    """Raise NonFiniteAdapter if *directory*'s adapter weights hold a NaN or an inf.

    A file that is not safetensors at all is not judged here (the manifest guards integrity).
    """
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        return
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except Exception as exc:  # noqa: BLE001  (not a safetensors file)
        log.debug("not checking %s for non-finite values: %s", path, exc)
        return
    with f:
        bad = nonfinite_tensors((k, f.get_tensor(k)) for k in f.keys())
    if bad:
        raise NonFiniteAdapter(f"refusing an adapter with {describe_nonfinite(bad)}")


def _paths(home: Path) -> tuple[Path, Path, Path]:
    cur = Path(home) / "current_model"
    return cur, cur.with_name("current_model.new"), cur.with_name("current_model.old")


def recover_current_model(home: Path) -> str:
    """Finish or undo an interrupted swap; returns what was done (for logs and tests)."""
    cur, new, old = _paths(home)
    action = "none"
    if cur.is_dir():
        for d in (new, old):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
                action = "cleaned"
    elif new.is_dir() and is_complete(new):
        os.rename(new, cur)
        fsync_dir(cur.parent)
        shutil.rmtree(old, ignore_errors=True)
        action = "rolled_forward"
    elif old.is_dir():
        os.rename(old, cur)
        fsync_dir(cur.parent)
        shutil.rmtree(new, ignore_errors=True)
        action = "rolled_back"
    elif new.exists():
        shutil.rmtree(new, ignore_errors=True)
        action = "cleaned"
    if action != "none":
        fsync_dir(cur.parent)
        log.warning("current_model recovery after an interrupted swap: %s", action)
    return action


def read_current(home: Path) -> tuple[Path | None, dict[str, Any]]:
    """(current_model dir or None, its trainer_state) after recovery."""
    recover_current_model(home)
    cur, _, _ = _paths(home)
    if not (cur / "adapter_config.json").is_file():
        return None, {}
    try:
        state = json.loads((cur / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    return cur, state


def _with_meta(write_files: Callable[[Path], None], meta_name: str,
               meta: dict[str, Any]) -> Callable[[Path], None]:
    """write_files, then the folder's JSON description (*meta_name*)."""
    def files(d: Path) -> None:
        write_files(d)
        (d / meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n",
                                   encoding="utf-8")
    return files


def publish_current(home: Path, write_files: Callable[[Path], None], state: dict[str, Any],
                    *, _crash_after: str | None = None) -> Path:
    """Replace current_model/ atomically with the adapter written by ``write_files(dir)``.

    ``_crash_after`` ("new" | "old") stops the swap half way: only for the recovery tests.
    Raises NonFiniteAdapter (current_model/ untouched, no temp dir left) for NaN/inf weights.
    """
    home = Path(home)
    recover_current_model(home)
    cur, new, old = _paths(home)
    try:
        fill_dir(new, _with_meta(write_files, TRAINER_STATE, state), check=check_finite)
    except NonFiniteAdapter:
        shutil.rmtree(new, ignore_errors=True)
        raise
    fsync_dir(home)
    if _crash_after == "new":
        return new
    if cur.exists():
        os.rename(cur, old)
        fsync_dir(home)
    if _crash_after == "old":
        return new
    os.rename(new, cur)
    fsync_dir(home)
    if old.exists():
        shutil.rmtree(old)
        fsync_dir(home)
    return cur


def _stem(name: str) -> str:
    stem = Path(name).name
    for suf in (".jsonl", ".json"):
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "dataset"


def write_snapshot(home: Path, dataset_name: str, source: Path, meta: dict[str, Any]) -> Path:
    """Copy the adapter in *source* (normally current_model/) to a new snapshot folder.

    Raises NonFiniteAdapter (nothing written) if the adapter holds NaN/inf weights."""
    snaps = Path(home) / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    base_name = f"{datetime.now().strftime('%Y%m%d_%H%M%S')}__{_stem(dataset_name)}"
    final = snaps / base_name
    n = 2
    while final.exists():
        final = snaps / f"{base_name}-{n}"
        n += 1
    tmp = snaps / f".tmp-{final.name}-{os.getpid()}"

    def copy(d: Path) -> None:
        for p in sorted(source.iterdir()):
            if p.is_file() and p.name not in ("manifest.json", OPTIMIZER_STATE):
                shutil.copy2(p, d / p.name)

    meta = {**meta, "created_at": datetime.now(timezone.utc).isoformat()}
    return publish_dir(tmp, final, _with_meta(copy, SNAPSHOT_META, meta), check=check_finite)


def find_snapshot(home: Path, job_id: int, sha256: str) -> Path | None:
    snaps = Path(home) / "snapshots"
    if not snaps.is_dir():
        return None
    for p in sorted(snaps.iterdir()):
        try:
            meta = json.loads((p / SNAPSHOT_META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("job_id") == job_id and meta.get("dataset_sha256") == sha256:
            return p
    return None
