"""One optimizer step and what can go wrong in it.

A step is ``gradient_accumulation`` micro-batches of ``micro_rows`` packed rows: the summed token
loss of each (under bf16/fp16 autocast, with the fp16 loss scaler) divided by the trained-token
count of the whole step, one host sync per step, then clip and AdamW.

* Out of memory in forward/backward redoes this step alone, exactly, with half the rows per
  micro-batch; in the optimizer update the job goes back to its last checkpoint (``_oom_backoff``);
  in eval the eval starts over with half its rows.
* A NaN/inf step is skipped (no update) and counted; too many in a row fail the job.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from typing import Any

import torch

from core.interface import JobResult, Outcome
from trainer.checkpoint import capture_rng_state, restore_rng_state
from trainer.errors import OOM_ERRORS, JobFailed, _OOM, _StepFailed, free_memory
from trainer.model import PRECISIONS, load_adapter_state

log = logging.getLogger("trainer.recipe")      # a part of the recipe: its lines keep the recipe's name


def micro_seed(seed: int, step: int, index: int) -> int:
    """The torch seed of micro-batch *index* of optimizer step *step* (1-based)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StepMixin:
    """The step of a run (trainer/recipe.py's ``_RecipeRun``): reads its model, params, device,
    precision, cfg, optimizer, scheduler, scaler, tracker, plan, train_ex and pad_id, and keeps
    micro_rows and the non-finite counts."""

    def _nonfinite_step(self, info: dict[str, Any]) -> None:
        """A skipped NaN/inf step: count it, report it; too many in a row fail the job."""
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        loss = info["loss"] if math.isfinite(info["loss"]) else None
        gnorm = info["grad_norm"] if math.isfinite(info["grad_norm"]) else None
        self.emit("nonfinite", step=self.step, loss=loss, grad_norm=gnorm,
                  consecutive=self.nonfinite_run, total=self.nonfinite_total)
        limit = int(self.cfg.get("max_nonfinite_steps", 10))
        what = f"loss {info['loss']:.4g}, grad norm {info['grad_norm']:.4g}"
        self.note(f"step {self.step}: non-finite {what}; step skipped (no update), "
                  f"{self.nonfinite_run} in a row (limit {limit}), {self.nonfinite_total} in this job",
                  "warning")
        if self.nonfinite_run >= limit:
            # the checkpoints pin this job's config (and may hold a diverged adapter): a retry
            # after lowering learning_rate must start the job afresh from current_model/
            if self.ranks.is_main:
                self.ckpts.remove_all()
            first = self.step - self.nonfinite_run + 1
            raise JobFailed(f"{self.nonfinite_run} non-finite steps in a row (steps {first}-{self.step}, "
                            f"last {what}); the training diverged or the data yields NaN/inf: lower "
                            f"learning_rate (now {float(self.cfg.get('learning_rate', 2e-4)):g}) or check "
                            f"the data; nothing was published (current_model/ unchanged)")

    def _loss_sum(self, batch: Any) -> torch.Tensor:
        from trainer.packing import loss_sum
        with self._autocast():
            return loss_sum(self.model, batch)

    def _autocast(self) -> Any:
        """bf16/fp16 autocast for the forward and the loss on a GPU (the chunked loss computes
        its logits in fp32 regardless); fp32 runs without it."""
        if self.precision == "fp32":
            import contextlib
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def _optimizer_step(self, group: list[list[list[int]]], capture_grads: bool) -> dict[str, Any]:
        """One optimizer step over *group*. An out-of-memory error in forward/backward redoes
        this step alone, exactly (RNG as it was, gradients zeroed) with half the rows per
        micro-batch; the steps before it stand."""
        t0 = time.perf_counter()
        rng = capture_rng_state()
        while True:
            info = self._try_step(group, capture_grads)
            if info is not None:
                info["dt"] = time.perf_counter() - t0
                return info
            # outside the except block: the failed step's activations are no longer referenced
            self.optimizer.zero_grad(set_to_none=True)
            free_memory()
            restore_rng_state(rng)
            # its scale as it was (no update ran), but not a half-done step: an OOM after unscale_
            # (in clip_grad_norm_) would make the redo's unscale_ raise
            self.scaler = self._new_scaler(self.scaler.state_dict())
            self._halve_micro_rows("training step")

    def _new_scaler(self, state: dict[str, Any] | None = None) -> Any:
        """The fp16 loss scaler (disabled for bf16/fp32), holding *state* if given."""
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if state:
            scaler.load_state_dict(state)
        return scaler

    def _halve_micro_rows(self, where: str) -> None:
        if self.micro_rows <= 1:
            raise _StepFailed(JobResult(
                Outcome.FAILED, steps=self.step, details={"crash": True, "oom": True},
                reason=f"CUDA out of memory in the {where} with 1 row per micro-batch (max_length "
                       f"{self.cfg['max_length']}); lower max_length or use a smaller base"))
        self.micro_rows //= 2
        accum = self.ga * math.ceil(int(self.cfg["batch_size"]) / self.micro_rows)
        self.emit("oom_backoff", micro_batch=self.micro_rows, gradient_accumulation=accum, step=self.step + 1)
        self.note(f"CUDA out of memory in the {where}: step {self.step + 1} redone with {self.micro_rows} "
                  f"rows per micro-batch ({accum} micro-batches per step)", "warning")

    def _try_step(self, group: list[list[list[int]]], capture_grads: bool) -> dict[str, Any] | None:
        """The step, or None after an out-of-memory error in its forward/backward (nothing updated)."""
        from trainer.packing import collate

        micro = [collate(self.train_ex, rows[k:k + self.micro_rows], self.pad_id)
                 for rows in group for k in range(0, len(rows), self.micro_rows)]
        n_trained = sum(m.num_trained_tokens for m in micro)       # the whole global step's
        n_tokens = sum(m.num_tokens for m in micro)
        denom = max(n_trained, 1)
        total = torch.zeros((), device=self.device)
        oom = False
        try:
            for i in self.ranks.share(len(micro)):    # all of them on one rank; i mod N on N ranks
                m = micro[i].to(self.device, non_blocking=True)
                # dropout's RNG per micro-batch, from (seed, step, index): the same masks on any
                # number of ranks, and after a resume on another number
                torch.manual_seed(micro_seed(int(self.cfg.get("seed", 0)), self.step + 1, i))
                loss_sum = self._loss_sum(m)
                self.scaler.scale(loss_sum / denom).backward()
                total += loss_sum.detach()            # one host sync per step, not per micro-batch
                del loss_sum
        except OOM_ERRORS:
            oom = True
        # N ranks: one all-reduce of the gradients, the loss and the OOM flag (every rank joins it,
        # so an out-of-memory redo is the whole group's)
        summed = self.ranks.reduce_step(self.params, [total, torch.tensor(float(oom), device=self.device)])
        if summed is not None:
            total, oom = torch.tensor(summed[0], device=self.device), oom or summed[1] > 0
        if oom:
            return None
        try:
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, float(self.cfg.get("max_grad_norm", 1.0)))
        except OOM_ERRORS:
            oom = True
        if oom:
            return None
        lr = float(self.scheduler.get_last_lr()[0])
        # The step's one host sync: loss and grad norm together, before the update. A NaN/inf
        # step is skipped (no optimizer.step: AdamW state stays clean; grads dropped below).
        loss_sum, gnorm = torch.stack([total.float(), grad_norm.detach().float().to(total.device)]).tolist()
        finite = math.isfinite(loss_sum) and math.isfinite(gnorm)
        overflow = self.scaler.is_enabled() and math.isfinite(loss_sum) and not finite
        try:
            if finite and capture_grads:
                self.tracker.capture_grads()
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)      # skips the update itself on inf/NaN grads
                self.scaler.update()                  # ... and lowers the loss scale
            elif finite:
                self.optimizer.step()
        except OOM_ERRORS as exc:   # the AdamW state may be half updated: back to the last checkpoint
            raise _OOM() from exc
        if overflow:                # fp16 overflow: the scaler's business, not a diverging run
            finite = True
            gnorm = float("nan")
            log.info("step %d: fp16 gradient overflow, step skipped; loss scale now %g",
                     self.step + 1, self.scaler.get_scale())
        with warnings.catch_warnings():   # a skipped first step: the schedule still advances
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum / denom, "grad_norm": gnorm, "finite": finite, "lr": lr,
                "tokens": n_tokens, "trained_tokens": n_trained}

    def evaluate(self, examples: Any = None) -> float:
        """Mean token loss on the held-out lines (or on *examples*); out of memory halves its rows
        and starts it over."""
        rows = self.micro_rows
        while True:
            oom = False
            try:
                return self._evaluate(rows, examples)
            except OOM_ERRORS:
                oom = True
            if oom:
                free_memory()
                if rows <= 1:
                    raise _StepFailed(JobResult(
                        Outcome.FAILED, steps=self.step, details={"crash": True, "oom": True},
                        reason=f"CUDA out of memory in eval with 1 row per batch (max_length "
                               f"{self.cfg['max_length']}); lower max_length or use a smaller base"))
                rows //= 2
                self.note(f"CUDA out of memory in eval: again with {rows} rows per batch", "warning")

    @torch.no_grad()
    def _evaluate(self, rows: int, examples: Any = None) -> float:
        from trainer.packing import make_batches

        self.model.eval()
        try:
            if examples is None:
                if self.eval_ex is None:
                    self.eval_ex = self.plan.eval_examples()
                examples = self.eval_ex
            if not len(examples):
                return float("nan")
            batches = make_batches(examples, max_length=int(self.cfg["max_length"]),
                                   rows_per_batch=rows, pad_token_id=self.pad_id,
                                   packing=bool(self.cfg.get("packing", True)),
                                   seed=int(self.cfg.get("seed", 0)), epoch=0)
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            n = 0
            for b in batches:
                total += self._loss_sum(b.to(self.device, non_blocking=True)).double()
                n += b.num_trained_tokens
        finally:
            self.model.train()
        return float(total) / max(n, 1)

    def _oom_backoff(self) -> JobResult | None:
        """Out of memory inside optimizer.step (rare: AdamW's state is made at the first step): the
        state may be half updated, so halve rows per micro-batch and go back to the last checkpoint."""
        self.optimizer.zero_grad(set_to_none=True)
        free_memory()
        if self.micro_rows <= 1:
            return JobResult(Outcome.FAILED, steps=self.step, details={"crash": True, "oom": True},
                             reason=f"CUDA out of memory with 1 row per micro-batch "
                                    f"(max_length {self.cfg['max_length']}); lower max_length or use a smaller base")
        self.micro_rows //= 2
        accum = self.ga * math.ceil(int(self.cfg["batch_size"]) / self.micro_rows)
        self.emit("oom_backoff", micro_batch=self.micro_rows, gradient_accumulation=accum, step=self.step + 1)
        self.note(f"CUDA out of memory in the optimizer update of step {self.step + 1}: back to the last "
                  f"checkpoint with {self.micro_rows} rows per micro-batch ({accum} micro-batches per step)",
                  "warning")
        micro = self.micro_rows
        payload, _ = self.ckpts.load_latest()
        # a fresh scaler: the failed scaler.step left this one mid-step (unscale_ done, no update),
        # so the next step's unscale_ would raise
        self.scaler = self._new_scaler()
        if payload is not None:
            self._restore(payload)
        else:
            adapter, rng = self._initial
            load_adapter_state(self.model, adapter)
            self._reset_optimizer()         # fresh AdamW, or current_model/'s again (trainer/continuity.py)
            restore_rng_state(rng)
            self.step = self.epoch = self.batch_index = 0
        self.micro_rows = micro
        return None
