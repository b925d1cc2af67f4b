"""A forgetting matrix in state.db as the daemon records it (core/evaltable.add_rows, the gate's
``held`` event, the jobs' ``snapshot`` events), for the Retention panel's tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core import evaltable
from core.paths import Layout
from core.statedb import StateDB

XSS_DATASET = "<img src=x onerror=alert(1)>.jsonl"
HELD_SNAPSHOT = "20260101_000200__reverse__held"
HELD_REASON = f"held: forgot {XSS_DATASET} by 347 %"
ADD_SNAPSHOT = "20260101_000100__add"


def row(job: int, name: str, loss: float | None, **extra: Any) -> dict[str, Any]:
    return {"dataset_job": job, "dataset": name, "loss": loss, "tokens": 240, "examples": 12,
            "seconds": 0.4, **extra}


def write_matrix(home: Path, *, extra_jobs: int = 0) -> None:
    """Two jobs (the first dataset's name hostile), a reference set, the second adapter held back by
    the gate; *extra_jobs* more columns, e.g. to make the table wider than a phone."""
    db = StateDB(Layout(home).state_db)
    try:
        ref = "reference: general.jsonl"
        evaltable.add_rows(db, 1, XSS_DATASET, [row(0, ref, 9.0688, baseline=18.5768), row(1, XSS_DATASET, 2.0543)])
        db.add_event("snapshot", f"snapshot saved: snapshots/{ADD_SNAPSHOT}", job_id=1,
                     data={"path": f"{home}/snapshots/{ADD_SNAPSHOT}"})
        evaltable.add_rows(db, 2, "reverse.jsonl", [row(0, ref, 7.9731, baseline=18.5768),
                                                    row(1, XSS_DATASET, 9.1811), row(2, "reverse.jsonl", 5.0693)])
        db.add_event("held", f"reverse.jsonl completed ({HELD_REASON}): current_model/ unchanged", level="warning",
                     job_id=2, data={"held": True, "summary": HELD_REASON,
                                     "snapshot": f"{home}/snapshots/{HELD_SNAPSHOT}"})
        for j in range(3, 3 + extra_jobs):
            name = f"more-{j}.jsonl"
            first = (row(1, XSS_DATASET, None, skipped="time budget (retention_eval_max_s) spent")
                     if j == 3 else row(1, XSS_DATASET, 9.5 + 0.1 * j))
            rows = [row(0, ref, 7.5 - 0.1 * j, baseline=18.5768), first, row(2, "reverse.jsonl", 5.0 + 0.2 * j)]
            rows += [row(k, f"more-{k}.jsonl", 3.0 + 0.05 * (j - k)) for k in range(3, j + 1)]
            evaltable.add_rows(db, j, name, rows)
            db.add_event("gate_passed", f"{name}: promotion gate passed: worst change +1 %", job_id=j,
                         data={"held": False, "summary": "passed: worst change +1 % (limit 5 %)"})
    finally:
        db.close()
    state = home / "current_model" / "trainer_state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"datasets": [{"name": XSS_DATASET, "job_id": 1}]}))
