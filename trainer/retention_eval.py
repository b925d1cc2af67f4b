"""Each file's retention set, and how the adapter does on the last K of them (the forgetting matrix).

A job's held-out lines (trainer/plan.py: positions ``[n_train, n)``, never trained on) are written
at its end to ``retention/job-<id>.json``: token ids and labels, and the tokenizer that made them.
After every job the final adapter, before it is published, is evaluated on the retention sets of
the last ``retention_eval_datasets`` datasets of its lineage (this one included), under no_grad,
within ``retention_eval_max_s`` (sets left over are reported as skipped). The rows go to the
daemon as one ``retention`` event: state.db, status/eval.json, ``trainer-ctl eval``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from core.atomic import atomic_write
from core.paths import Layout
from trainer.data import Example
from trainer.tokencache import tokenizer_hash


def set_path(layout: Layout, job_id: int) -> Path:
    return layout.retention / f"job-{int(job_id)}.json"


def save_set(layout: Layout, meta: dict[str, Any], examples: Any) -> Path | None:
    """Write a job's retention set (atomic); None when it has no held-out examples."""
    if not len(examples):
        return None
    rows = [{"input_ids": [int(x) for x in e.input_ids], "labels": [int(x) for x in e.labels],
             "line": int(e.line)} for e in examples]
    layout.retention.mkdir(parents=True, exist_ok=True)
    path = set_path(layout, meta["job_id"])
    atomic_write(path, json.dumps({**meta, "examples": rows}, separators=(",", ":")) + "\n")
    return path


def load_set(path: Path) -> tuple[dict[str, Any], list[Example]] | None:
    """A retention set's meta and examples; None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        examples = [Example(input_ids=list(r["input_ids"]), labels=list(r["labels"]), line=int(r["line"]))
                    for r in data.pop("examples")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data, examples


class RetentionEvalMixin:
    """The retention side of a run (trainer/recipe.py's ``_RecipeRun``; ``finish`` calls it)."""

    def retention_eval(self) -> dict[str, Any] | None:
        """Save this job's retention set, evaluate the adapter on the last K sets, emit the rows."""
        cfg, job = self.cfg, self.job
        tok = tokenizer_hash(self.tokenizer)
        if self.plan.n_eval:
            if self.eval_ex is None:
                self.eval_ex = self.plan.eval_examples()
            save_set(self.layout, {"job_id": job.job_id, "name": job.name, "sha256": job.sha256,
                                   "tokenizer": tok}, self.eval_ex)
        k = int(cfg.get("retention_eval_datasets") or 0)
        if k <= 0:
            return None
        lineage = [d.get("job_id") for d in (self.parent_state or {}).get("datasets") or []] + [job.job_id]
        ids = [j for j in dict.fromkeys(lineage) if isinstance(j, int) and set_path(self.layout, j).is_file()]
        budget, t0 = float(cfg.get("retention_eval_max_s") or 300.0), time.monotonic()
        rows = [self._retention_row(j, tok, t0 + budget) for j in ids[-k:]]
        out = {"after_job": job.job_id, "after_name": job.name, "rows": rows,
               "seconds": round(time.monotonic() - t0, 3)}
        done = [r for r in rows if r.get("loss") is not None]
        self.note(f"retention eval: {len(done)} of {len(rows)} dataset(s) in {out['seconds']:.1f} s")
        self.emit("retention", **out)
        return out

    def _retention_row(self, job_id: int, tok: str, deadline: float) -> dict[str, Any]:
        row: dict[str, Any] = {"dataset_job": job_id}
        loaded = load_set(set_path(self.layout, job_id))
        if loaded is None:
            return {**row, "skipped": "its retention set could not be read"}
        meta, examples = loaded
        row["dataset"] = meta.get("name")
        if meta.get("tokenizer") != tok:
            return {**row, "skipped": "made with another tokenizer"}
        if time.monotonic() > deadline:
            return {**row, "skipped": "time budget (retention_eval_max_s) spent"}
        t = time.monotonic()
        loss = self.evaluate(examples)
        return {**row, "loss": loss if math.isfinite(loss) else None, "examples": len(examples),
                "tokens": sum(e.num_trained for e in examples), "seconds": round(time.monotonic() - t, 3)}
