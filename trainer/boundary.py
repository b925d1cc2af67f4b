"""What a run does at a step boundary besides stepping: obey pause / resume / skip / stop, on every
rank at the same step (rank 0 reads the daemon's commands and broadcasts each, trainer/distributed.py),
and the hand-over of rank 0's data to the other ranks at the start of a job."""
from __future__ import annotations

import logging
import time

from core.interface import Command, JobResult, Outcome
from trainer.distributed import KEEPALIVE_S
from trainer.errors import _Finished

log = logging.getLogger("trainer.recipe")

PAUSE_WAIT_S = 3600.0


class BoundaryMixin:
    """Part of trainer/recipe.py's ``_RecipeRun``: reads its control, ranks, step, stream."""

    def _command(self, wait_s: float | None = None) -> Command | None:
        """Rank 0's next command (polled, or waited for up to *wait_s*), the same on every rank."""
        cmd = None
        if self.ranks.is_main:
            cmd = self.control.poll() if wait_s is None else self.control.wait(wait_s)
        return self.ranks.command(cmd)

    def _control(self) -> JobResult | None:
        """Obey the control source at a step boundary."""
        cmd = self._command()
        # a waiting rank 0 speaks every KEEPALIVE_S, so the others' broadcast never times out
        wait_s = PAUSE_WAIT_S if self.ranks.world == 1 else KEEPALIVE_S
        while cmd is Command.PAUSE:
            self.save_checkpoint("pause")
            self.emit("paused", step=self.step)
            self.note(f"paused at step {self.step}")
            if not self.ranks.is_main:
                log.info("%s: paused at step %d", self.ranks, self.step)
            while cmd is None or cmd is Command.PAUSE:
                cmd = self._command(wait_s)
            if cmd is Command.RESUME:
                self.emit("resumed", step=self.step)
                self.note(f"resumed at step {self.step}")
                if not self.ranks.is_main:
                    log.info("%s: resumed at step %d", self.ranks, self.step)
                cmd = self._command()
        if cmd is Command.SKIP:
            self.save_checkpoint("skip")
            return JobResult(Outcome.SKIPPED, reason="skipped", steps=self.step)
        if cmd is Command.STOP:
            self.save_checkpoint("stop")
            return JobResult(Outcome.STOPPED, reason="stopped", steps=self.step)
        return None

    # ------------------------------------------------------------ the start of a job on N ranks
    def wait_for_main(self) -> None:
        """Another rank: wait until rank 0 has chosen the checkpoint and tokenized the file (its
        cache is then complete: this rank reads it, never writes it)."""
        if self.ranks.is_main:
            return
        self._ranks_told = True
        while (word := self.ranks.share_object()) == "wait":
            pass
        if word != "ready":
            raise _Finished(JobResult(Outcome.FAILED, reason=f"rank 0 ended the job before training ({word})"))

    def data_ready(self) -> None:
        """Rank 0: with other ranks, tokenize the whole file first (each reads its cache), then
        tell them."""
        if self.ranks.world == 1 or not self.ranks.is_main:
            return
        world, ga = self.ranks.world, self.ga
        if ga % world:      # a step's micro-batches are dealt i mod N: some ranks get fewer or none
            self.note(f"{world} ranks, gradient_accumulation {ga}: a step's {ga} micro-batches do not share "
                      f"evenly ({'some ranks idle' if ga < world else 'uneven'}); a multiple of {world} "
                      "uses every rank fully", "warning")
        self.stream.wait_complete(self._tokenizing_keepalive)
        self._ranks_told = True
        self.ranks.share_object("ready")

    def _tokenizing_keepalive(self) -> None:
        self._tokenizing()
        now = time.monotonic()
        if now - getattr(self, "_keepalive_at", 0.0) >= KEEPALIVE_S:
            self._keepalive_at = now
            self.ranks.share_object("wait")

    def release_ranks(self) -> None:
        """Rank 0 leaving a job before :meth:`data_ready`: the waiting ranks end it too."""
        if self.ranks.world > 1 and self.ranks.is_main and not self._ranks_told:
            self._ranks_told = True
            try:
                self.ranks.share_object("ended")
            except Exception:  # noqa: BLE001 - a rank already gone: torchrun ends the group
                log.exception("could not tell the other ranks that the job ended")
