"""Each file's retention set, and how the adapter does on the last K of them (the forgetting matrix).

A job's held-out lines (trainer/plan.py: positions ``[n_train, n)``, never trained on) are written
at its end to ``retention/job-<id>.json``: token ids and labels, and the tokenizer that made them.
After every job the final adapter, before it is published, is evaluated on the retention sets of
the last ``retention_eval_datasets`` datasets of its lineage (this one included), under no_grad,
within ``retention_eval_max_s`` (sets left over are reported as skipped). The rows go to the
daemon as one ``retention`` event: state.db, status/eval.json, ``trainer-ctl eval``. An optional
fixed reference set (``reference_eval_file``, e.g. general chat the user wants kept) is row 0,
its change measured from the base model's own loss on it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from core.atomic import atomic_write, sha256_file
from core.paths import Layout, resolve_under
from trainer.data import Example
from trainer.tokencache import tokenizer_hash


REFERENCE_JOB = 0       # the reference set's row in the matrix (job ids start at 1)


def set_path(layout: Layout, job_id: int) -> Path:
    return layout.retention / f"job-{int(job_id)}.json"


def save_set(layout: Layout, meta: dict[str, Any], examples: Any, *, path: Path | None = None) -> Path | None:
    """Write a job's retention set (atomic); None when it has no held-out examples."""
    if not len(examples):
        return None
    rows = [{"input_ids": [int(x) for x in e.input_ids], "labels": [int(x) for x in e.labels],
             "line": int(e.line)} for e in examples]
    layout.retention.mkdir(parents=True, exist_ok=True)
    path = path or set_path(layout, meta["job_id"])
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
        if cfg.get("reference_eval_file"):
            rows.insert(0, self._reference_row(tok, t0 + budget))
        out = {"after_job": job.job_id, "after_name": job.name, "rows": rows,
               "seconds": round(time.monotonic() - t0, 3)}
        if not rows:
            return None                 # no retention set yet (eval_fraction 0): no column
        done = [r for r in rows if r.get("loss") is not None]
        self.note(f"retention eval: {len(done)} of {len(rows)} dataset(s) in {out['seconds']:.1f} s")
        self.emit("retention", **out)
        return out

    def _reference_row(self, tok: str, deadline: float) -> dict[str, Any]:
        """The fixed reference set (``reference_eval_file``) as the matrix's row 0: its first
        ``eval_max_examples`` examples, tokenized once per (file, tokenizer) into retention/, and
        the base model's own loss on them (its baseline, once per base)."""
        from trainer.data import DataError, load_examples

        raw = str(self.cfg["reference_eval_file"])
        path = resolve_under(Path(self.job.home), raw)
        row: dict[str, Any] = {"dataset_job": REFERENCE_JOB, "dataset": f"reference: {Path(raw).name}"}
        if path is None or not path.is_file():
            return {**row, "skipped": f"reference_eval_file {raw} not found"}
        key = f"{sha256_file(path)[:16]}-{tok[:16]}-{int(self.cfg['max_length'])}"
        cached = self.layout.retention / f"reference-{key}.json"
        loaded = load_set(cached)
        if loaded is None:
            try:
                examples, _ = load_examples(path, self.tokenizer, max_length=int(self.cfg["max_length"]),
                                            truncation=str(self.cfg.get("truncation", "keep_answer")))
            except DataError as exc:
                return {**row, "skipped": f"reference_eval_file: {exc}"}
            examples = examples[:int(self.cfg.get("eval_max_examples") or 200)]
            save_set(self.layout, {"job_id": REFERENCE_JOB, "name": row["dataset"], "tokenizer": tok,
                                   "baselines": {}}, examples, path=cached)
            loaded = load_set(cached)
        meta, examples = loaded                                   # type: ignore[misc]
        if time.monotonic() > deadline:
            return {**row, "skipped": "time budget (retention_eval_max_s) spent"}
        baselines = meta.get("baselines") or {}
        if self.fingerprint not in baselines:          # the base alone, without the adapter
            with self.model.disable_adapter():
                base_loss = self.evaluate(examples)
            baselines[self.fingerprint] = base_loss if math.isfinite(base_loss) else None
            save_set(self.layout, {**meta, "baselines": baselines}, examples, path=cached)
        return {**self._eval_row(row, examples), "baseline": baselines[self.fingerprint]}

    def _eval_row(self, row: dict[str, Any], examples: list[Example]) -> dict[str, Any]:
        t = time.monotonic()
        loss = self.evaluate(examples)
        return {**row, "loss": loss if math.isfinite(loss) else None, "examples": len(examples),
                "tokens": sum(e.num_trained for e in examples), "seconds": round(time.monotonic() - t, 3)}

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
        return self._eval_row(row, examples)
