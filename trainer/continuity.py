"""One optimizer across files. With a continuous schedule (core/config.py CONTINUOUS_SCHEDULES)
current_model/ carries the AdamW state (``optimizer.pt``, in its manifest) and the schedule
position (trainer_state.json's ``schedule``: the adapter's optimizer steps across files), so
dataset after dataset continues one run instead of a sawtooth of per-file restarts.

A job that does not resume a checkpoint continues that state only when all of these hold:
- its schedule is continuous and it continues the adapter in current_model/ (not a fresh one:
  the first job, after a consolidation, after an unlocked LoRA key);
- trainer_state.json names the optimizer state, the folder's manifest verifies (a half-written or
  damaged file is never used), and it was saved with exactly this adapter (the sha256 of
  adapter_model.safetensors it records is the manifest's);
- the trainable LoRA parameters match in name, shape and order (``param_signature``).
Otherwise AdamW starts fresh and the step count at 0 (so warmup runs again), and a warning and a
``fresh_optimizer`` event say why. A resumed job takes both from its checkpoint (exact resume).
The job's ``learning_rate`` and ``weight_decay`` always come from its own config, not from the
loaded state. The per-file schedules (cosine, linear, constant) publish no optimizer state.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.artifacts import ADAPTER_WEIGHTS, MANIFEST, OPTIMIZER_STATE, CheckpointError, verify_manifest
from core.atomic import sha256_file
from core.config import CONTINUOUS_SCHEDULES
from trainer.checkpoint import CheckpointPayload, save_torch
from trainer.model import save_adapter

DEFAULT_SCHEDULE = "constant_with_warmup"


def param_signature(model: Any) -> str:
    """sha256 of the trainable parameters' names and shapes, in optimizer order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(f"{name}:{tuple(p.shape)}\n".encode())
    return h.hexdigest()


class ContinuityMixin:
    """The optimizer of a run (trainer/recipe.py's ``_RecipeRun``): made, continued from
    current_model/, published with the adapter."""

    def _schedule_kind(self) -> str:
        return str(self.cfg.get("lr_scheduler", DEFAULT_SCHEDULE))

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params, lr=float(self.cfg.get("learning_rate", 2e-4)),
                                 weight_decay=float(self.cfg.get("weight_decay", 0.0)))

    def _continue_optimizer(self, cur_dir: Path | None, payload: CheckpointPayload | None) -> None:
        """Set the schedule's step offset; load current_model/'s AdamW state where it continues."""
        self.schedule_offset, self.optimizer_from = 0, "fresh"
        self._continued_from: Path | None = None
        if payload is not None:         # its checkpoint holds the optimizer and the offset
            self.schedule_offset = int(payload.state.get("schedule_offset") or 0)
            self.optimizer_from = "checkpoint"
            return
        if self._schedule_kind() not in CONTINUOUS_SCHEDULES or cur_dir is None:
            return
        sched = (self.parent_state or {}).get("schedule") or {}
        why = self._why_not_continue(cur_dir, sched)
        if why is None:
            try:
                self._load_optimizer_state(cur_dir / OPTIMIZER_STATE)
            except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
                why = f"its optimizer state does not load ({type(exc).__name__}: {exc})"
                self.optimizer = self._new_optimizer()
        if why is not None:
            self.note(f"a fresh AdamW for this job: {why}; the schedule's step count starts at 0 "
                      f"(warmup_steps {int(self.cfg.get('warmup_steps', 0))})", "warning")
            self.emit("fresh_optimizer", reason=why)
            return
        self.schedule_offset, self.optimizer_from = int(sched.get("global_step") or 0), "current_model"
        self._continued_from = cur_dir / OPTIMIZER_STATE
        self.note(f"AdamW and the {self._schedule_kind()} schedule continue from current_model/ "
                  f"(step {self.schedule_offset})")

    def _why_not_continue(self, cur_dir: Path, sched: dict[str, Any]) -> str | None:
        if not sched:
            return "current_model/ holds no optimizer state (it was written before optimizer continuity)"
        if not sched.get("optimizer_state"):
            return (f"current_model/ holds no optimizer state (its last job used the per-file "
                    f"lr_scheduler {sched.get('lr_scheduler')})")
        try:
            verify_manifest(cur_dir)
            files = json.loads((cur_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
        except (CheckpointError, OSError, ValueError, KeyError) as exc:
            return f"current_model/ does not verify ({exc})"
        if OPTIMIZER_STATE not in files:
            return f"current_model/ holds no {OPTIMIZER_STATE} (an adapter restored from a snapshot?)"
        if (files.get(ADAPTER_WEIGHTS) or {}).get("sha256") != sched.get("adapter_sha256"):
            return f"current_model/'s {OPTIMIZER_STATE} was saved with another adapter"
        if sched.get("param_signature") != param_signature(self.model):
            return "the LoRA parameters differ from those the optimizer state was saved for"
        return None

    def _load_optimizer_state(self, path: Path) -> None:
        """current_model/'s AdamW state (moments, step counts), with this job's lr and weight decay."""
        self.optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        for p in self.params:
            st = self.optimizer.state.get(p) or {}
            if "exp_avg" in st and st["exp_avg"].shape != p.shape:
                raise ValueError(f"a moment of shape {tuple(st['exp_avg'].shape)} for a parameter of "
                                 f"shape {tuple(p.shape)}")
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.cfg.get("learning_rate", 2e-4))
            group["weight_decay"] = float(self.cfg.get("weight_decay", 0.0))
            group.pop("initial_lr", None)       # the scheduler takes this job's learning_rate

    def _reset_optimizer(self) -> None:
        """The optimizer and schedule as the job started them (an out-of-memory redo before any
        checkpoint): AdamW fresh, or again current_model/'s state."""
        self.optimizer.state.clear()
        if self._continued_from is not None:
            self._load_optimizer_state(self._continued_from)
        self.scheduler = self._make_scheduler()

    def _schedule_state(self) -> dict[str, Any]:
        """trainer_state.json's ``schedule``: where the next job's schedule and AdamW go on."""
        kind = self._schedule_kind()
        warmup = int(self.cfg.get("warmup_steps", 0))
        step = self.schedule_offset + self.step
        cont = kind in CONTINUOUS_SCHEDULES
        return {"lr_scheduler": kind, "global_step": step, "warmup_steps": warmup,
                "warmup_done": step >= warmup,
                "decayed": kind == "wsd" and float(self.cfg.get("wsd_decay_fraction", 0.0)) > 0,
                "optimizer_state": OPTIMIZER_STATE if cont else None,
                "param_signature": param_signature(self.model) if cont else None,
                "adapter_sha256": None}          # filled in once the adapter file is written

    def _current_writer(self, state: dict[str, Any]) -> Callable[[Path], None]:
        """What current_model/ is made of: the adapter and, with a continuous schedule, the AdamW
        state and the adapter's sha256 in *state* (written after these files, in the manifest)."""
        def write(d: Path) -> None:
            save_adapter(self.model, d)
            sched = state.get("schedule") or {}
            if sched.get("optimizer_state"):
                save_torch(self.optimizer.state_dict(), d / OPTIMIZER_STATE)
                sched["adapter_sha256"] = sha256_file(d / ADAPTER_WEIGHTS)
        return write
