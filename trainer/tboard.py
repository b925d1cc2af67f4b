"""TensorBoard export (``tensorboard: true``): the worker's events as TensorBoard event files.

``runs/<base>-<fingerprint>/`` holds one run per base: every job on that base adds its own event
file there, and its steps continue the adapter's step count (current_model/'s ``total_steps``
when the job started), so ``tensorboard --logdir runs`` shows the whole continuous history as one
line per base, a consolidation starting the next run.

Written from the events the worker already sends (a sink in front of the worker's own):

* ``step``: train/loss, train/learning_rate, train/grad_norm, train/tokens_per_second (real
  tokens), train/peak_memory_bytes
* ``eval``: eval/loss
* ``retention``: retention/<dataset> for every dataset of the forgetting matrix (reference too)
* ``probe``: probe/<n> texts (the prompt, the answer, the reference answer)

A writer that fails (a full disk) is dropped with one warning: TensorBoard never fails a job.
"""
from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from core.paths import Layout
from trainer.distributed import is_main_process

log = logging.getLogger(__name__)

STEP_SCALARS = (("loss", "train/loss"), ("learning_rate", "train/learning_rate"), ("grad_norm", "train/grad_norm"),
                ("tokens_per_second", "train/tokens_per_second"), ("peak_memory_bytes", "train/peak_memory_bytes"))


def run_dir(runs: Path, base_model: str, fingerprint: str | None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(base_model)).name or "base")[:60]
    return runs / f"{name}-{(fingerprint or 'unknown')[:8]}"


def _steps_before(home: Path) -> int:
    """The adapter's step count when this job started (current_model/trainer_state.json)."""
    try:
        state = json.loads((home / "current_model" / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state.get("total_steps") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


class TensorBoardSink:
    """An EventSink that forwards every event to *inner* and writes the scalars above."""

    def __init__(self, inner: Any, home: Path, runs: Path, job_id: int) -> None:
        self.inner, self.home, self.runs, self.job_id = inner, Path(home), Path(runs), job_id
        self.writer: Any = None
        self.offset = 0
        self.last_step = 0
        self.failed = False

    def emit(self, ev: dict[str, Any]) -> None:
        self.inner.emit(ev)
        if self.failed:
            return
        try:
            self._write(ev)
        except Exception as exc:  # noqa: BLE001 — an export must never end a job
            self.failed = True
            log.warning("TensorBoard export stopped for this job: %s: %s", type(exc).__name__, exc)
            self.inner.emit({"event": "log", "level": "warning",
                             "message": f"TensorBoard export stopped for this job ({type(exc).__name__}: {exc})"})

    def _write(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "started":
            from torch.utils.tensorboard import SummaryWriter

            self.close()
            self.offset = _steps_before(self.home)
            d = run_dir(self.runs, str(ev.get("base_model") or "base"), ev.get("base_fingerprint"))
            self.writer = SummaryWriter(log_dir=str(d), filename_suffix=f".job{self.job_id}")
            return
        w = self.writer
        if w is None:
            return
        if kind == "step" and isinstance(ev.get("step"), int):
            self.last_step = self.offset + ev["step"]
            for key, tag in STEP_SCALARS:
                if isinstance(ev.get(key), (int, float)):
                    w.add_scalar(tag, float(ev[key]), self.last_step)
        elif kind == "eval" and isinstance(ev.get("eval_loss"), (int, float)):
            step = self.offset + int(ev.get("step") or 0)
            w.add_scalar("eval/loss", float(ev["eval_loss"]), step)
        elif kind == "retention":
            for row in ev.get("rows") or []:
                if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
                    w.add_scalar(f"retention/{row.get('dataset') or row.get('dataset_job')}", float(row["loss"]),
                                 self.last_step)
            w.flush()
        elif kind == "probe":
            for i, p in enumerate(ev.get("probes") or []):
                if isinstance(p, dict):
                    text = (f"**prompt:** {p.get('prompt')}\n\n**answer:** {p.get('answer')}"
                            + (f"\n\n**reference:** {p.get('reference')}" if p.get("reference") else ""))
                    w.add_text(f"probe/{i}", text, self.offset + int(ev.get("step") or 0))
            w.flush()

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("TensorBoard writer close failed: %s", exc)
            self.writer = None


@contextmanager
def exported(job: Any, sink: Any) -> Iterator[Any]:
    """*sink*, or with ``tensorboard`` on a TensorBoardSink in front of it, closed at the end."""
    if not job.config.get("tensorboard") or not is_main_process():     # rank 0 alone writes
        yield sink
        return
    board = TensorBoardSink(sink, Path(job.home), Layout(Path(job.home)).runs, job.job_id)
    try:
        yield board
    finally:
        board.close()
