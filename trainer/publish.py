"""What finishing a job publishes and checks: current_model/'s ``trainer_state.json`` (the lineage
of datasets), the snapshot's metadata, the in-memory adapter checked finite before anything is
written, and a job that a crash left already published (finished without training again)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.config import LORA_KEYS
from core.interface import JobResult, Outcome
from trainer import adapter_store
from trainer.checkpoint import CheckpointManager
from trainer.errors import JobFailed
from trainer.resume import _now


class PublishMixin:
    """The publishing side of a run (trainer/recipe.py's ``_RecipeRun``, whose ``finish`` uses it)."""

    def _trainer_state(self) -> dict[str, Any]:
        parent = self.parent_state or {}
        entry = {"name": self.job.name, "sha256": self.job.sha256, "job_id": self.job.job_id,
                 "steps": self.step, "final_loss": self.last_loss, "eval_loss": self.eval_loss,
                 "examples": self.report.examples, "trained_tokens": self.report.trained_tokens,
                 "completed_at": _now()}
        peft_cfg = self.model.peft_config["default"]
        targets = peft_cfg.target_modules
        fresh = getattr(self, "fresh_after", None)
        if fresh:      # a fresh adapter (the LoRA settings changed): its lineage starts here
            fresh = {"reason": fresh, "datasets": len(parent.get("datasets") or []),
                     "total_steps": parent.get("total_steps"), "lora": parent.get("lora")}
            parent = {}
        return {"base_model": str(self.base), "base_fingerprint": self.fingerprint,
                "datasets": list(parent.get("datasets") or []) + [entry],
                "total_steps": int(parent.get("total_steps") or 0) + self.step,
                **({"fresh_after": fresh} if fresh else {}),
                "schedule": self._schedule_state(),     # trainer/continuity.py
                "lora_config": {k: self.cfg.get(k) for k in LORA_KEYS},
                "lora": {"r": peft_cfg.r, "alpha": peft_cfg.lora_alpha, "dropout": peft_cfg.lora_dropout,
                         "target_modules": (sorted({t.rsplit(".", 1)[-1] for t in targets})
                                            if isinstance(targets, (set, list)) else targets)},
                "updated_at": _now()}

    def _check_adapter_finite(self) -> None:
        """JobFailed if the in-memory adapter holds NaN/inf (one host sync; details only then)."""
        named = [(n, p.detach()) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
            return
        bad = adapter_store.nonfinite_tensors(named)
        self.ckpts.remove_all()   # a retry must not resume from this state
        raise JobFailed(f"the trained adapter holds {adapter_store.describe_nonfinite(bad)}; "
                        f"nothing was published (current_model/ unchanged): lower learning_rate "
                        f"(now {float(self.cfg.get('learning_rate', 2e-4)):g}) or check the data")

    def _snapshot_meta(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {"job_id": self.job.job_id, "dataset": self.job.name, "dataset_sha256": self.job.sha256,
                "steps": entry.get("steps"), "final_train_loss": entry.get("final_loss"),
                "eval_loss": entry.get("eval_loss"), "base_model": str(self.base),
                "base_fingerprint": self.fingerprint,
                "data_report": self.report_json() if getattr(self, "report", None) else None,
                **({"probes": self.end_probes} if getattr(self, "end_probes", None) else {})}

    def _already_completed(self, cur_dir: Path, cur_state: dict[str, Any]) -> JobResult:
        """current_model/ already holds this job (a crash after the swap): finish the bookkeeping."""
        entry = cur_state["datasets"][-1]
        snap = adapter_store.find_snapshot(Path(self.job.home), self.job.job_id, self.job.sha256)
        if snap is None:
            snap = adapter_store.write_snapshot(Path(self.job.home), self.job.name, cur_dir,
                                                self._snapshot_meta(entry))
            self.emit("snapshot", path=str(snap))
        CheckpointManager.for_job(self.layout.checkpoints, self.job.job_id, 1).remove_all()
        self.note(f"job {self.job.job_id} was already trained into current_model/; nothing to do")
        return JobResult(Outcome.COMPLETED, steps=int(entry.get("steps") or 0), details={
            "already_completed": True, "final_loss": entry.get("final_loss"),
            "eval_loss": entry.get("eval_loss"), "snapshot": str(snap), "current_model": str(cur_dir)})
