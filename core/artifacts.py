"""The files an adapter folder is made of, and its manifest (what every reader checks).

current_model/, snapshots/*, checkpoints/job-*/step-* each hold a ``manifest.json``
(sha256 + size of every other file), written last, so a folder whose manifest verifies is
complete. Stdlib only: the daemon, the trainer, the monitor and the operations read these names.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from core.atomic import fsync_dir, fsync_file, sha256_file

MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"    # peft's own format
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"             # current_model/: base, datasets in order, steps
OPTIMIZER_STATE = "optimizer.pt"                 # current_model/ (continuous schedule), checkpoints
SNAPSHOT_META = "snapshot.json"                  # snapshots/*: what made the snapshot
CONSOLIDATION_META = "consolidation.json"        # consolidated_models/*/ (also the switch journal)
BACKUP_SUFFIX = "__pre-consolidation"            # snapshots/<ts>__pre-consolidation/


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or cannot be loaded."""


def write_manifest(directory: Path) -> dict[str, Any]:
    """Hash every regular file of *directory* (except the manifest), fsync them, write the manifest."""
    files: dict[str, Any] = {}
    for p in sorted(directory.iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        fsync_file(p)
        files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {"files": files}
    mpath = directory / MANIFEST
    with open(mpath, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(directory)
    return manifest


def verify_manifest(directory: Path) -> None:
    """Raise CheckpointError unless every file named in the manifest is present and matches."""
    mpath = directory / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory}: unreadable manifest: {exc}") from None
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if p.stat().st_size != meta.get("size"):
            raise CheckpointError(f"{directory}: {name} has size {p.stat().st_size}, manifest says {meta.get('size')}")
        if sha256_file(p) != meta.get("sha256"):
            raise CheckpointError(f"{directory}: {name} does not match its sha256 in the manifest")


# how trainer_state.json's "lora" (what peft built) names config.json's LoRA keys
_LORA_RECORD = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}


def is_complete(directory: Path) -> bool:
    """True when *directory*'s manifest verifies (every file present, sized and hashed as listed)."""
    try:
        verify_manifest(directory)
        return True
    except CheckpointError:
        return False


def recorded_lora(state: dict[str, Any]) -> dict[str, Any]:
    """The LoRA settings an adapter was made with, by config key, from its trainer_state.json:
    "lora_config" (every key), or for an older one "lora" (r, alpha, dropout)."""
    if isinstance(state.get("lora_config"), dict):
        return dict(state["lora_config"])
    lora = state.get("lora") if isinstance(state.get("lora"), dict) else {}
    return {k: lora[v] for k, v in _LORA_RECORD.items() if v in lora}


def current_lora(home: Path) -> dict[str, Any]:
    """``recorded_lora`` of current_model/ ({} without an adapter or a readable state)."""
    try:
        state = json.loads((Path(home) / "current_model" / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return recorded_lora(state) if isinstance(state, dict) else {}


def fill_dir(tmp: Path, write_files: Callable[[Path], None],
             check: Callable[[Path], None] | None = None) -> None:
    """Write a folder that counts as complete once its manifest is there: ``write_files(tmp)``,
    ``check(tmp)`` (a refusal raises before the manifest), then the manifest, which fsyncs every
    file and the folder. An old *tmp* (a crash's leftover) is replaced."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_files(tmp)
    if check is not None:
        check(tmp)
    write_manifest(tmp)


def publish_dir(tmp: Path, final: Path, write_files: Callable[[Path], None],
                check: Callable[[Path], None] | None = None) -> Path:
    """``fill_dir`` into the hidden *tmp* beside *final*, then one rename and an fsync of the
    parent: *final* is absent or complete. On any failure *tmp* is removed and nothing is left."""
    try:
        fill_dir(tmp, write_files, check)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    return final
