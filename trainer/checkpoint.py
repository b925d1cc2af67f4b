"""Atomic, verifiable training checkpoints: home/checkpoints/job-<id>/step-<n>/.

A checkpoint is written into a hidden temp dir beside its final place, every file fsynced, a
``manifest.json`` (sha256 + size of every other file) written last, the temp dir fsynced, renamed
to ``step-<n>`` and the parent fsynced. So a ``step-<n>`` folder is either absent or complete; a
crash leaves at most a ``.tmp-*`` folder, removed on the next save.

Contents of ``step-<n>/``::

    adapter_config.json, adapter_model.safetensors   the LoRA weights (peft format)
    optimizer.pt, scheduler.pt                       torch state dicts
    rng.pt                                           python, numpy, torch (+cuda) RNG states
    state.json                                       step, data position, job id, dataset sha256,
                                                     base path + fingerprint, locked config, ...
    manifest.json                                    {"files": {name: {"sha256", "size"}}}

Loading is newest first: a checkpoint whose manifest does not match its files, or which fails to
load, is logged and skipped in favour of the one before it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from core.artifacts import (publish_dir,   # noqa: F401 (re-exported)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    CheckpointError,
    verify_manifest,
    write_manifest,
)
from core.atomic import fsync_dir, fsync_file, sha256_file  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

STATE = "state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """Every RNG that training touches, in a form torch.load(weights_only=True) accepts."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": str(np_name), "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["key"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- payload

@dataclass
class CheckpointPayload:
    """What a checkpoint holds once loaded into memory (nothing applied yet)."""
    path: Path
    state: dict[str, Any]
    adapter_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    adapter_config: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_checkpoint(directory: Path) -> CheckpointPayload:
    """Verify and load one checkpoint folder; any problem raises CheckpointError."""
    from safetensors.torch import load_file

    verify_manifest(directory)
    try:
        state = json.loads((directory / STATE).read_text(encoding="utf-8"))
        adapter_config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        adapter_state = load_file(str(directory / ADAPTER_WEIGHTS))
        optimizer = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        scheduler = torch.load(directory / "scheduler.pt", map_location="cpu", weights_only=True)
        rng = torch.load(directory / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure makes the checkpoint unusable
        raise CheckpointError(f"{directory}: cannot load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{directory}: state.json has no step")
    return CheckpointPayload(directory, state, adapter_state, optimizer, scheduler, rng, adapter_config)


# ----------------------------------------------------------------------------- manager

class CheckpointManager:
    """The checkpoints of one job: save atomically, keep the last *keep*, load newest valid."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = max(1, int(keep))

    @classmethod
    def for_job(cls, checkpoints_dir: Path, job_id: int, keep: int) -> "CheckpointManager":
        return cls(Path(checkpoints_dir) / f"job-{job_id}", keep)

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def list_steps(self) -> list[tuple[int, Path]]:
        """Completed checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def save(self, step: int, write_files: Callable[[Path], None]) -> Path:
        """Write a checkpoint for *step*: ``write_files(tmp_dir)`` writes everything but the
        manifest. Returns the final folder.

        If ``step-<n>`` already exists (e.g. a pause right after a periodic checkpoint), it holds
        the same state and is kept as is.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        if final.is_dir():
            try:
                verify_manifest(final)
                return final
            except CheckpointError as exc:
                log.warning("replacing invalid checkpoint %s: %s", final, exc)
                shutil.rmtree(final)
                fsync_dir(self.root)
        self._remove_temps()
        publish_dir(self.root / f".tmp-step-{step}-{os.getpid()}", final, write_files)
        self.prune()
        return final

    def prune(self) -> None:
        steps = self.list_steps()
        for _, p in steps[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)
        if len(steps) > self.keep:
            fsync_dir(self.root)

    def _remove_temps(self) -> None:
        for p in self.root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)

    def candidates(self) -> Iterator[Path]:
        """Checkpoint folders, newest first."""
        for _, p in reversed(self.list_steps()):
            yield p

    def load_latest(self) -> tuple[CheckpointPayload | None, list[str]]:
        """The newest checkpoint that verifies and loads, plus a note for each one skipped."""
        skipped: list[str] = []
        for p in self.candidates():
            try:
                return load_checkpoint(p), skipped
            except CheckpointError as exc:
                log.warning("checkpoint %s unusable, falling back to the previous one: %s", p, exc)
                skipped.append(str(exc))
        return None, skipped

    def remove_all(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
            fsync_dir(self.root.parent)


def save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
