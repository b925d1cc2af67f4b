"""What a checkpoint records (its ``state.json``) and how a job continues from one: a checkpoint
is used only if it continues what current_model/ holds now, on the same base and dataset; a job
keeps the config values it started with (``TRAINING_KEYS``); ``_restore`` puts back everything
exact resume needs (adapter, AdamW state, scheduler, loss scaler, RNGs, position)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import torch

from core.artifacts import recorded_lora
from core.config import LOCKED_KEYS, LORA_KEYS
from trainer.checkpoint import CheckpointPayload, restore_rng_state
from trainer.model import BaseMismatchError, check_same_base, load_adapter_state

# Keys that define what a job computes: a resumed job keeps the values it started with (a config
# edit applies to the next job), so its continuation is exact.
TRAINING_KEYS = ("base_model", "model_name", "max_length", "batch_size", "gradient_accumulation",
                 "use_qlora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                 "learning_rate", "lr_scheduler", "warmup_steps", "wsd_decay_fraction", "weight_decay",
                 "max_grad_norm",
                 "epochs", "seed", "truncation", "eval_fraction", "eval_max_examples", "replay_fraction",
                 "replay_datasets", "packing",
                 "attn_implementation",
                 "precision")


def lora_change(state: dict[str, Any], cfg: dict[str, Any]) -> str | None:
    """How this job's LoRA settings differ from those the adapter in current_model/ was made with
    (its trainer_state.json: "lora_config", or for an older one "lora"), in words; None if not."""
    recorded = recorded_lora(state)
    diffs = [f"{k} {recorded[k]!r} -> {cfg.get(k)!r}" for k in LORA_KEYS
             if k in recorded and cfg.get(k) is not None and recorded[k] != cfg.get(k)]
    return ", ".join(diffs) or None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _lineage(state: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies one version of current_model/: its datasets in order and when it was written."""
    return (tuple((d.get("job_id"), d.get("sha256")) for d in state.get("datasets") or []),
            state.get("total_steps"), state.get("updated_at"))


def _describe_lineage(state: dict[str, Any]) -> str:
    ds = state.get("datasets") or []
    if not ds:
        return "no adapter"
    return f"{len(ds)} dataset(s), last {ds[-1].get('name')} (job {ds[-1].get('job_id')})"


class ResumeMixin:
    """Checkpoint state and resume for a run (trainer/recipe.py's ``_RecipeRun``)."""

    def _restart(self, why: str) -> None:
        """This job's checkpoints cannot be continued: start it again from current_model/."""
        self.note(f"job {self.job.job_id}: {why}; restarting this job from the current adapter "
                  "(its old checkpoints are removed)", "warning")
        self.emit("restarted", reason=why)
        self.ckpts.remove_all()

    def _check_checkpoint(self, payload: CheckpointPayload) -> CheckpointPayload | None:
        """The checkpoint if it continues what current_model/ holds now, else None (restart).

        A checkpoint extends the adapter its job started from. If current_model/ has moved on
        since (another job finished, a consolidation made a new base and a fresh adapter), going
        on from the checkpoint and publishing would erase that training: the job restarts from
        the current adapter instead, so lineage stays [..., the other job, this job].
        """
        st = payload.state
        try:
            check_same_base(f"checkpoint {payload.path}", st.get("base_model"), st.get("base_fingerprint"),
                            self.base, self.fingerprint)
        except BaseMismatchError as exc:
            self._restart(f"its checkpoint is on another base ({exc})")
            return None
        if _lineage(st.get("parent_state") or {}) != _lineage(self.parent_state):
            self._restart("current_model/ changed since its checkpoint was written (now "
                          f"{_describe_lineage(self.parent_state)}, then "
                          f"{_describe_lineage(st.get('parent_state') or {})})")
            return None
        if st.get("dataset_sha256") != self.job.sha256:
            self._restart(f"its checkpoints in {self.ckpts.root} belong to another dataset "
                          f"({str(st.get('dataset_sha256'))[:12]})")
            return None
        saved = st.get("config") or {}
        changed = {k: (saved[k], self.cfg.get(k)) for k in TRAINING_KEYS
                   if k in saved and saved[k] != self.cfg.get(k)}
        if changed:
            self.note("config changed since this job started; the job keeps its original values "
                      "(changes apply to the next job): "
                      + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in changed.items()), "warning")
            self.cfg.update({k: saved[k] for k in changed})
        return payload

    def _adapter_copy(self) -> dict[str, torch.Tensor]:
        from trainer.model import adapter_state_dict
        return {k: v.clone() for k, v in adapter_state_dict(self.model).items()}

    def _restore(self, payload: CheckpointPayload) -> None:
        """Everything exact resume needs, from a loaded checkpoint."""
        st = payload.state
        load_adapter_state(self.model, payload.adapter_state)
        self.optimizer.load_state_dict(payload.optimizer)
        self.scheduler.load_state_dict(payload.scheduler)
        if st.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(st["grad_scaler"])
        restore_rng_state(payload.rng)
        self.step = int(st["step"])
        self.epoch, self.batch_index = int(st["epoch"]), int(st["batch_index"])
        self.micro_rows = int(st.get("micro_rows", self.micro_rows))
        self.last_loss = st.get("last_loss")
        self.eval_loss = st.get("eval_loss")
        self.nonfinite_total = int(st.get("nonfinite_steps") or 0)
        self.note(f"resumed from {payload.path} (step {self.step}, epoch {self.epoch}, "
                  f"batch {self.batch_index})")

    def _state(self, reason: str) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "epoch": self.epoch,
                "batch_index": self.batch_index, "micro_rows": self.micro_rows,
                "job_id": self.job.job_id, "dataset": self.job.name, "dataset_sha256": self.job.sha256,
                "base_model": str(self.base), "base_fingerprint": self.fingerprint,
                "locked": {k: self.cfg.get(k) for k in LOCKED_KEYS},
                "config": {k: self.cfg.get(k) for k in TRAINING_KEYS},
                "last_loss": self.last_loss, "eval_loss": self.eval_loss,
                "nonfinite_steps": self.nonfinite_total,
                "schedule_offset": self.schedule_offset,     # the continuous schedule's start
                "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "parent_state": self.parent_state, "reason": reason, "saved_at": _now()}
