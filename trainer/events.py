"""What a run reports as it goes: events to the sink, log lines (also sent as ``log`` events), and
each optimizer step's ``step`` event (loss, learning rate, tokens/s, ETA, peak memory)."""
from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

log = logging.getLogger("trainer.recipe")      # a part of the recipe: its lines keep the recipe's name


def _rss_bytes() -> int:
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0


class EventsMixin:
    """Reporting of a run (trainer/recipe.py's ``_RecipeRun``): reads its sink, step, total_steps,
    device, and keeps last_loss, peak_rss and the recent step times (for the ETA)."""

    def emit(self, event: str, **fields: Any) -> None:
        self.sink.emit({"event": event, **fields})

    HEARTBEAT_S = 1.0

    @contextmanager
    def heartbeat(self, phase: str) -> Iterator[None]:
        """``heartbeat`` events every HEARTBEAT_S while a long silent call runs (loading a base:
        minutes for a large one), so the daemon's hang limit counts it as progress."""
        done = threading.Event()
        t0 = time.monotonic()

        def beat() -> None:
            while not done.wait(self.HEARTBEAT_S):
                self.emit("heartbeat", phase=phase, seconds=round(time.monotonic() - t0, 1))

        thread = threading.Thread(target=beat, name=f"heartbeat-{phase}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def note(self, message: str, level: str = "info") -> None:
        getattr(log, "warning" if level == "warning" else "info")(message)
        self.emit("log", level=level, message=message)

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        self.peak_rss = max(self.peak_rss, _rss_bytes())
        return self.peak_rss

    def _emit_step(self, info: dict[str, Any], epoch_progress: float) -> None:
        # a skipped (non-finite) step reports loss and grad_norm None: charts show a gap
        loss = info["loss"] if info["finite"] else None
        # (an fp16 overflow step: the loss is real, the gradient norm is not)
        gnorm = info["grad_norm"] if info["finite"] and math.isfinite(info["grad_norm"]) else None
        if loss is not None:
            self.last_loss = loss
        self._step_times.append(info["dt"])
        recent = self._step_times
        eta = sum(recent) / len(recent) * (self.total_steps - self.step)
        tps = info["tokens"] / info["dt"] if info["dt"] > 0 else None
        self.emit("step", step=self.step, total_steps=self.total_steps, loss=loss,
                  learning_rate=info["lr"], grad_norm=gnorm, tokens_per_second=tps,
                  step_time_s=info["dt"], epoch=round(epoch_progress, 4), tokens=info["tokens"],
                  trained_tokens=info["trained_tokens"], peak_memory_bytes=self._peak_memory(),
                  eta_seconds=eta)
        log.info("step %d/%d loss %.4f lr %.3g grad %.3f %.0f tok/s %.2fs", self.step, self.total_steps,
                 info["loss"], info["lr"], info["grad_norm"], tps or 0.0, info["dt"])
