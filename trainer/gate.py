"""The promotion gate, the worker's side: after the retention eval, before current_model/ changes.

``retention_gate`` (trainer/recipe.py's ``finish`` calls it after the final checkpoint) runs the
retention eval and keeps its losses for the adapter's ``trainer_state.json`` (``gate_state``: the
reference the next job is judged against). With ``promotion_gate`` on it judges the adapter
against the one in current_model/ (core/promotion.py ``judge``): passed, finish publishes as
always; held, the adapter is written as ``snapshots/<ts>__<dataset>__held/`` (kind "held", the
verdict in its snapshot.json, its would-be trainer_state.json), current_model/ stays as it was,
and the job completes with the reason ``held: forgot add.jsonl by 7 %``. A retried job (a crash
after that snapshot) finds and reuses it. Not gated: the first adapter (nothing to replace) and a
fresh adapter after a LoRA change (it replaces on purpose). A retention eval that failed holds
the adapter (the gate cannot tell it is safe).
"""
from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from core.artifacts import SNAPSHOT_META, TRAINER_STATE, publish_dir
from core.diskfull import is_disk_full
from core.interface import JobResult, Outcome
from core.promotion import HELD_KIND, RETENTION_KEY, describe, judge, reference_losses, retention_record
from core.switch import dataset_entries
from trainer import adapter_store
from trainer.errors import JobFailed
from trainer.model import save_adapter


def find_held(home: Path, job_id: int, sha256: str) -> Path | None:
    """The held snapshot an earlier attempt of this job already wrote, if any."""
    snaps = Path(home) / "snapshots"
    for p in sorted(snaps.glob("*__held*")) if snaps.is_dir() else []:
        try:
            meta = json.loads((p / SNAPSHOT_META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("kind") == HELD_KIND and meta.get("job_id") == job_id and meta.get("dataset_sha256") == sha256:
            return p
    return None


def write_held(home: Path, dataset_name: str, write_adapter: Callable[[Path], None], state: dict[str, Any],
               meta: dict[str, Any]) -> Path:
    """``snapshots/<ts>__<dataset stem>__held/``: adapter, trainer_state.json, snapshot.json,
    manifest; written hidden and renamed (core/artifacts.py publish_dir); NaN/inf refused."""
    snaps = Path(home) / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset_name).name.removesuffix(".jsonl"))[:80] or "dataset"
    name = f"{datetime.now().strftime('%Y%m%d_%H%M%S')}__{stem}__held"
    final, n = snaps / name, 2
    while final.exists():
        final, n = snaps / f"{name}-{n}", n + 1

    def files(d: Path) -> None:
        write_adapter(d)
        for fname, obj in ((TRAINER_STATE, state), (SNAPSHOT_META, meta)):
            (d / fname).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")

    return publish_dir(snaps / f".tmp-{final.name}-{os.getpid()}", final, files, check=adapter_store.check_finite)


class GateMixin:
    """The gate side of a run (trainer/recipe.py's ``_RecipeRun``)."""

    gate_state: dict[str, Any]      # what trainer_state.json gets: {"retention": ...}; set by retention_gate

    def retention_gate(self) -> JobResult | None:
        """The retention eval, the probes, then the gate: None to publish, or the held job's result."""
        out, failed = None, None
        try:            # before publishing: a crash in it redoes it from the final checkpoint
            out = self.retention_eval()
        except (OSError, ValueError, RuntimeError) as exc:
            if is_disk_full(exc):
                raise           # the disk, not the eval: the daemon pauses and the job resumes
            failed = f"{type(exc).__name__}: {exc}"
            self.note(f"retention eval failed ({failed}); this job has no column in the forgetting matrix",
                      "warning")
        self.probe_end()      # the probe prompts' answers now (trainer/probes.py), also the snapshot's
        record = retention_record(out)
        self.gate_state = {RETENTION_KEY: record} if record else {}
        if not self.cfg.get("promotion_gate"):
            return None
        if not (self.parent_state or {}).get("datasets") or getattr(self, "fresh_after", None):
            self.note("promotion gate: no earlier adapter to compare with (first or fresh adapter): published")
            return None
        limit = float(self.cfg.get("max_retention_regression", 0.05))
        if failed is not None:
            verdict = {"held": True, "error": f"the retention eval failed ({failed})",
                       "max_retention_regression": limit, "checked": [], "regressions": [], "unchecked": []}
        else:
            verdict = judge((out or {}).get("rows") or [], reference_losses(self.parent_state), limit, self.job.job_id)
        verdict["summary"] = describe(verdict)
        if not verdict["held"]:
            self.note(f"promotion gate {verdict['summary']}")
            self.emit("gate", **verdict)
            return None
        return self._hold(verdict)

    def _hold(self, verdict: dict[str, Any]) -> JobResult:
        """Keep the adapter as a held snapshot; current_model/ is left as it is."""
        home = Path(self.job.home)
        state = {**self._trainer_state(), **self.gate_state}
        snap = find_held(home, self.job.job_id, self.job.sha256)
        if snap is None:
            meta = {**self._snapshot_meta(state["datasets"][-1]), "kind": HELD_KIND, "gate": verdict,
                    "datasets": dataset_entries(state), "total_steps": state.get("total_steps"),
                    "created_at": datetime.now(timezone.utc).isoformat()}
            try:
                snap = write_held(home, self.job.name, lambda d: save_adapter(self.model, d), state, meta)
            except adapter_store.NonFiniteAdapter as exc:
                self.ckpts.remove_all()
                raise JobFailed(f"{exc}; nothing was kept (current_model/ unchanged)") from exc
        self.emit("gate", **verdict, snapshot=str(snap))
        self.note(f"promotion gate {verdict['summary']}: current_model/ unchanged; this job's adapter is "
                  f"kept as {snap} (trainer-ctl promote {snap.name})", "warning")
        self.ckpts.remove_all()
        return JobResult(Outcome.COMPLETED, reason=verdict["summary"], steps=self.step, details={
            "held": {**verdict, "snapshot": str(snap)}, "snapshot": str(snap), "final_loss": self.last_loss,
            "eval_loss": self.eval_loss, "base_fingerprint": self.fingerprint, "data": self.report_json(),
            "train_seconds": round(time.monotonic() - self.t_start, 3), "nonfinite_steps": self.nonfinite_total})
