"""The in-process QLoRA recipe: one dataset, trained into the continuous adapter.

Reads top to bottom like a torchtune recipe:

    setup()            config, base (located + fingerprinted + locked), data, plan, model + LoRA,
                       optimizer, scheduler, resume from the newest valid checkpoint
    train()            the base's probe answers; optimizer steps; after each: events, layer activity,
                       eval at epoch end, periodic checkpoint and probes, control (pause / resume /
                       skip / stop)
    save_checkpoint()  atomic step-<n>/ folder with everything exact resume needs
    finish()           final checkpoint, retention eval, probes + promotion gate (trainer/gate.py),
                       current_model/ swap (or a held snapshot), snapshot, checkpoints removed
    cleanup()          free the model

One optimizer step = ``gradient_accumulation`` micro-batches of ``batch_size`` packed rows; the
loss is the summed token cross-entropy divided by the trained-token count of the whole step, so
splitting a batch into smaller micro-batches (OOM back-off) computes the same step. On N torchrun
ranks (trainer/distributed.py) the step's micro-batches are dealt out and one all-reduce sums
the gradients: the same step again; rank 0 alone reports and writes.

Exact resume: the data plan is a pure function of (seed, epoch) (trainer/packing.py), so a
checkpoint stores only the position (epoch, batch index); with the adapter, AdamW state,
scheduler and every RNG (python, numpy, torch, cuda) restored, the continued run is the
uninterrupted run (bitwise on CPU). Dropout is seeded per micro-batch from (seed, step, index), so
it holds on any number of ranks, and from N ranks to M.

The run's parts, each a mixin of ``_RecipeRun`` in a module of its own: trainer/dataprep.py (the
token stream, the plan, preparation progress), trainer/step.py (one optimizer step, the loss, eval,
the out-of-memory redo and back-off, non-finite steps), trainer/resume.py (what a checkpoint
records, its checks, exact restore), trainer/publish.py (what finish publishes), trainer/events.py
(events and the step event), trainer/continuity.py (AdamW made, continued from and published to
current_model/), trainer/probes.py (the probe prompts' answers), trainer/boundary.py (control at a step
boundary, on every rank); trainer/errors.py holds the exceptions,
trainer/schedule.py the LR schedules.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.interface import ControlSource, EventSink, JobResult, JobSpec, Outcome
from core.paths import Layout
from trainer import adapter_store
from trainer.boundary import BoundaryMixin
from trainer.checkpoint import CheckpointManager, capture_rng_state, save_torch
from trainer.continuity import ContinuityMixin
from trainer.dataprep import DataPrepMixin
from trainer.distributed import Ranks
from trainer.errors import OOM_ERRORS, JobFailed, _Finished, _OOM, _StepFailed, free_memory
from trainer.events import EventsMixin
from trainer.gate import GateMixin
from trainer.layer_activity import LayerActivityTracker
from trainer.model import (FINGERPRINT_CACHE_NAME, BaseMismatchError, BaseModelError, attach_lora,
                           base_fingerprint, check_same_base, enable_tf32, load_base_model, load_tokenizer,
                           pick_device, resolve_base_path, resolve_precision, save_adapter,
                           trainable_parameters, want_gradient_checkpointing)
from trainer.probes import ProbeMixin
from trainer.publish import PublishMixin
from trainer.resume import lora_change, _describe_lineage, ResumeMixin
from trainer.retention_eval import RetentionEvalMixin
from trainer.schedule import fraction_scheduler
from trainer.step import StepMixin
from trainer.tboard import exported
from trainer.warm import WarmBase

log = logging.getLogger("trainer.recipe")


class QLoRATrainer:
    """Trainer protocol, in process. The worker (trainer/worker.py) wraps it for the daemon."""

    name = "qlora"

    def __init__(self, warm: "WarmBase | None" = None, ranks: Ranks | None = None) -> None:
        self.warm = warm        # a warm worker's loaded base, kept between jobs (trainer/warm.py)
        self.ranks = ranks or Ranks()   # this process's place among torchrun's ranks (trainer/distributed.py)

    def run(self, job: JobSpec, sink: EventSink, control: ControlSource) -> JobResult:
        with exported(job, sink) as sink:       # with ``tensorboard``: the events as TensorBoard files too
            return self._run(job, sink, control)

    def _run(self, job: JobSpec, sink: EventSink, control: ControlSource) -> JobResult:
        r = _RecipeRun(job, sink, control, self.warm, self.ranks)
        keep_base = False       # only a job that ended in an orderly way hands its base on
        try:
            r.setup()
            outcome = r.train()
            if outcome is None:
                outcome = r.finish()
            keep_base = not outcome.details.get("oom")
            return outcome
        except _Finished as done:
            return done.result
        except (BaseModelError, BaseMismatchError) as exc:   # the setup, not the data: daemon pauses
            log.error("job %d blocked: %s", job.job_id, exc)
            return JobResult(Outcome.FAILED, reason=str(exc), steps=r.step, details={"blocking": True})
        except JobFailed as exc:
            log.error("job %d failed: %s", job.job_id, exc)
            keep_base = True
            return JobResult(Outcome.FAILED, reason=str(exc), steps=r.step)
        except Exception as exc:  # data errors and the unexpected: the job fails, not the caller
            from trainer.data import DataError
            if isinstance(exc, DataError):
                log.error("job %d: %s", job.job_id, exc)
                keep_base = True
                return JobResult(Outcome.FAILED, reason=str(exc), steps=r.step)
            raise
        finally:
            r.release_ranks()       # the other ranks wait for rank 0's data until told
            r.cleanup(keep_base)


class _RecipeRun(DataPrepMixin, StepMixin, BoundaryMixin, ResumeMixin, PublishMixin, RetentionEvalMixin,
                 GateMixin, ContinuityMixin, ProbeMixin, EventsMixin):
    def __init__(self, job: JobSpec, sink: EventSink, control: ControlSource,
                 warm: "WarmBase | None" = None, ranks: Ranks | None = None) -> None:
        self.job, self.sink, self.control, self.warm = job, sink, control, warm
        self.ranks = ranks or Ranks()
        self._ranks_told = False
        self.base_key: tuple[Any, ...] | None = None
        self.layout = Layout(Path(job.home))
        self.cfg: dict[str, Any] = dict(job.config)
        self.step = 0
        self.epoch = 0
        self.batch_index = 0
        self.total_steps = 0
        self.model: Any = None
        self.last_loss: float | None = None
        self.eval_loss: float | None = None
        self.peak_rss = 0
        self.nonfinite_run = 0       # NaN/inf steps skipped in a row
        self.nonfinite_total = 0     # ... in this job (kept in checkpoints)
        self._prep_phase: str | None = None      # data preparation progress (``_preparing``)
        self._prep_t0 = self._prep_last = 0.0
        self._prep_last_sent: tuple[str, int, int] | None = None
        self._step_times: collections.deque[float] = collections.deque(maxlen=50)   # for the ETA

    # ================================================================== setup
    def setup(self) -> None:
        job, cfg = self.job, self.cfg
        self.wait_for_main()        # other ranks: until rank 0 has chosen the checkpoint, tokenized the file
        self.device = pick_device(cfg.get("device", "auto"))
        self.base = resolve_base_path(cfg, Path(job.home))
        self.note(f"job {job.job_id} {job.name}: base {self.base}, device {self.device}; fingerprinting base")
        self.layout.checkpoints.mkdir(parents=True, exist_ok=True)
        self.fingerprint = base_fingerprint(self.base, self.layout.checkpoints / FINGERPRINT_CACHE_NAME)

        # --- the continuous adapter this job builds on
        cur_dir, cur_state = adapter_store.read_current(Path(job.home))
        if cur_dir is not None:
            check_same_base(f"current_model/ ({cur_dir})", cur_state.get("base_model"),
                            cur_state.get("base_fingerprint"), self.base, self.fingerprint)
            done = cur_state.get("datasets") or []
            if done and done[-1].get("job_id") == job.job_id and done[-1].get("sha256") == job.sha256:
                raise _Finished(self._already_completed(cur_dir, cur_state))
        self.parent_state = cur_state
        # the LoRA keys are locked: a change here was unlocked on purpose (trainer-ctl config unlock)
        self.fresh_after = lora_change(cur_state, cfg) if cur_dir is not None else None
        if self.fresh_after:
            self.note(f"the LoRA settings changed ({self.fresh_after}): this job starts a fresh adapter; "
                      "the previous one stays in snapshots/ (trainer-ctl lineage)", "warning")
            self.emit("fresh_adapter", reason=self.fresh_after, previous=_describe_lineage(cur_state))
            cur_dir = None

        # --- newest valid checkpoint of this job (corrupt ones fall back to the previous)
        self.ckpts = CheckpointManager.for_job(self.layout.checkpoints, job.job_id,
                                               int(cfg.get("keep_checkpoints", 3)))
        payload, skipped = self.ckpts.load_latest()
        for msg in skipped:
            self.note(f"skipping unusable checkpoint: {msg}", "warning")
        if payload is not None:
            payload = self._check_checkpoint(payload)
        self.payload = payload

        # --- data and the deterministic plan
        seed = int(cfg.get("seed", 0))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        tok_key = (str(self.base), self.fingerprint)
        self.tokenizer = self.warm.tokenizer_for(tok_key) if self.warm is not None else None
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.base)
            if self.warm is not None:
                self.warm.keep_tokenizer(tok_key, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._load_data()           # on N ranks: rank 0 tokenizes the whole file first, then tells the others
        self.stream.hold(True)      # the rest of the file waits while the model loads (CPU, GIL)

        # --- model: base (4-bit) + LoRA from checkpoint / current_model / fresh
        base_model = self._load_base()
        adapter_src = payload.path if payload is not None else cur_dir
        torch.manual_seed(seed)     # a fresh LoRA starts the same whether the base was loaded now or before
        self.model = attach_lora(base_model, cfg, adapter_src)
        self.model.train()
        self.params = trainable_parameters(self.model)
        self.optimizer = self._new_optimizer()
        self._continue_optimizer(cur_dir, payload)   # AdamW + schedule position from current_model/
        self.scheduler = self._make_scheduler()
        # fp16 needs loss scaling (its range is too small for gradients); bf16 and fp32 do not
        self.scaler = self._new_scaler()
        self.micro_rows = int(cfg["batch_size"])
        if payload is not None:
            self._restore(payload)
        else:
            self._initial = (self._adapter_copy(), capture_rng_state())
        self.ranks.same_params(self.params)
        self.tracker = LayerActivityTracker(self.model)
        self.stream.hold(False)
        self.note(f"{len(self.tracker.modules)} LoRA modules, {sum(p.numel() for p in self.params)} trainable "
                  f"parameters; {self.total_steps} steps ({self.plan_sizes} micro-batches per epoch)")
        self.emit("started", total_steps=self.total_steps, resumed_from_step=self.step,
                  dataset=self.report_json(), data_cache=self.data_cache, base_model=str(self.base),
                  base_fingerprint=self.fingerprint, device=str(self.device), ranks=self.ranks.world,
                  optimizer=self.optimizer_from, schedule_step=self.schedule_offset + self.step,
                  continued_from=("checkpoint" if payload is not None else
                                  "current_model" if cur_dir is not None else "fresh"))
        self.t_start = time.monotonic()

    def _load_base(self) -> Any:
        """The base (4-bit nf4 unless ``use_qlora`` is off) in this job's precision, attention and
        gradient checkpointing: the warm worker's when it holds the same key, else loaded now.
        Sets ``precision`` and ``base_key`` (what a warm worker keeps the base under)."""
        cfg = self.cfg
        use_qlora = bool(cfg.get("use_qlora", True))
        self.precision = resolve_precision(str(cfg.get("precision", "auto")), self.device)
        gc_on = want_gradient_checkpointing(cfg.get("gradient_checkpointing", "auto"), self.base)
        attn = str(cfg.get("attn_implementation", "auto"))
        if attn == "flex_attention" and self.device.type != "cuda":
            # PyTorch has no flex-attention backward off CUDA: train with SDPA (same result)
            self.note("attn_implementation flex_attention trains on CUDA only (PyTorch has no flex "
                      f"backward on {self.device.type}): using sdpa here", "warning")
            attn = "sdpa"
        if self.device.type == "cuda":
            enable_tf32()
            # this job's peak (a warm worker ran others before it)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base_key = (str(self.base), self.fingerprint, use_qlora, str(self.device), attn, gc_on,
                         self.precision)
        base_model = self.warm.take(self.base_key) if self.warm is not None else None
        if base_model is None:
            self.note(f"loading base ({'4-bit nf4' if use_qlora else 'full precision'}, {self.precision}"
                      f"{', gradient checkpointing' if gc_on else ''})")
            with self.heartbeat("loading base"):
                base_model = load_base_model(self.base, use_qlora=use_qlora, device=self.device,
                                             attn_implementation=attn, gradient_checkpointing=gc_on,
                                             precision=self.precision)
        else:
            self.note(f"base already loaded ({self.precision}); attaching this job's adapter")
        return base_model

    def _make_scheduler(self) -> Any:
        """The job's LR schedule: continuous from the adapter's step count, or per file over the
        fraction of the job done (trainer/schedule.py)."""
        return fraction_scheduler(self.optimizer, self._schedule_kind(), int(self.cfg.get("warmup_steps", 0)),
                                  self.plan.fraction, self.schedule_offset,
                                  float(self.cfg.get("wsd_decay_fraction", 0.0)))

    # ================================================================== train
    def train(self) -> JobResult | None:
        """Run the remaining steps. Returns a JobResult when stopped/skipped/failed, else None."""
        self.probe_base()           # the base's answers to the probe prompts (trainer/probes.py)
        outcome = self._control()
        if outcome is not None:
            return outcome
        while True:
            try:
                return self._train_epochs()
            except _StepFailed as failed:
                return failed.result
            except _OOM:
                pass
            outcome = self._oom_backoff()      # outside the except block: the traceback is gone
            if outcome is not None:
                return outcome

    def _train_epochs(self) -> JobResult | None:
        every_la = int(self.cfg.get("layer_activity_every_steps", 10))
        every_ckpt = int(self.cfg.get("checkpoint_every_steps", 50))
        plan = self.plan
        for epoch in range(self.epoch, self.epochs):
            b = self.batch_index if epoch == self.epoch else 0
            while (group := plan.group(epoch, b)) is not None:
                report_la = (self.step + 1) % every_la == 0
                info = self._optimizer_step(group, capture_grads=report_la)
                b += len(group)
                self.step += 1
                self.epoch, self.batch_index = epoch, b
                epoch_end = plan.group(epoch, b) is None     # plans the next window if need be
                self.total_steps = plan.total_steps()
                self._emit_step(info, plan.epoch_progress(epoch, b))
                self._tokenizing()
                if info["finite"]:
                    self.nonfinite_run = 0
                else:
                    self._nonfinite_step(info)      # raises JobFailed after max_nonfinite_steps in a row
                if report_la:
                    self.emit("layer_activity", **self.tracker.report(self.step))
                if epoch_end and self.plan.n_eval and self.ranks.is_main:
                    ev = self.evaluate()
                    self.eval_loss = ev if math.isfinite(ev) else None
                    if self.eval_loss is None:
                        self.note(f"eval loss at step {self.step} is not finite ({ev})", "warning")
                    self.emit("eval", step=self.step, eval_loss=self.eval_loss, epoch=epoch + 1)
                if not (epoch_end and epoch == self.epochs - 1):      # the last step: finish() does both
                    if self.step % every_ckpt == 0:
                        self.save_checkpoint("periodic")
                    self.probe_step()
                outcome = self._control()
                if outcome is not None:
                    return outcome
        if self.step == 0:
            raise JobFailed(f"{self.job.name}: no trainable examples ({self.report.to_json()})")
        return None

    # ================================================================== checkpoints
    def save_checkpoint(self, reason: str) -> Path | None:
        if not self.ranks.is_main:      # rank 0 writes; the data position is global
            return None
        state = self._state(reason)

        def write(d: Path) -> None:
            save_adapter(self.model, d)
            save_torch(self.optimizer.state_dict(), d / "optimizer.pt")
            save_torch(self.scheduler.state_dict(), d / "scheduler.pt")
            save_torch(capture_rng_state(), d / "rng.pt")
            (d / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n",
                                          encoding="utf-8")

        oom = False
        try:
            path = self.ckpts.save(self.step, write)
        except OOM_ERRORS:      # copies to the host need a little GPU memory: free the cache, once more
            oom = True
        if oom:
            free_memory()
            self.note(f"CUDA out of memory writing checkpoint step {self.step}: freed the cache, again",
                      "warning")
            path = self.ckpts.save(self.step, write)
        self.emit("checkpoint", step=self.step, path=str(path), reason=reason)
        log.info("checkpoint step %d (%s): %s", self.step, reason, path)
        return path

    # ================================================================== finish
    def finish(self) -> JobResult:
        if not self.ranks.is_main:      # rank 0 evaluates and publishes
            return JobResult(Outcome.COMPLETED, steps=self.step)
        self.stream.wait_complete(self._tokenizing)         # the whole file's data report
        self._tokenizing()
        self._check_adapter_finite()
        self.save_checkpoint("final")
        self._save_replay_pool()    # before publishing: a crash redoes it from the final checkpoint
        held = self.retention_gate()    # the retention eval, then the promotion gate (trainer/gate.py)
        if held is not None:
            return held
        state = {**self._trainer_state(), **self.gate_state}
        try:
            cur = adapter_store.publish_current(Path(self.job.home), self._current_writer(state), state)
        except adapter_store.NonFiniteAdapter as exc:   # the in-memory check makes this a last guard
            self.ckpts.remove_all()
            raise JobFailed(f"{exc}; nothing was published (current_model/ unchanged)") from exc
        self.note(f"current_model/ updated ({len(state['datasets'])} datasets, {state['total_steps']} steps)")
        try:
            snap = adapter_store.write_snapshot(Path(self.job.home), self.job.name, cur,
                                                self._snapshot_meta(state["datasets"][-1]))
        except adapter_store.NonFiniteAdapter as exc:
            raise JobFailed(f"snapshot of {cur}: {exc}") from exc
        self.emit("snapshot", path=str(snap))
        self.ckpts.remove_all()
        elapsed = time.monotonic() - self.t_start
        if self.nonfinite_total:
            self.note(f"{self.nonfinite_total} non-finite steps were skipped in this job", "warning")
        return JobResult(Outcome.COMPLETED, steps=self.step, details={
            "final_loss": self.last_loss, "eval_loss": self.eval_loss, "snapshot": str(snap),
            "current_model": str(cur), "base_fingerprint": self.fingerprint,
            "data": self.report_json(), "train_seconds": round(elapsed, 3),
            "nonfinite_steps": self.nonfinite_total})

    # ================================================================== cleanup
    def cleanup(self, keep_base: bool = True) -> None:
        """Free the job's state. A warm worker keeps the base: this job's LoRA layers are taken
        off (``unload``, nothing merged) and the bare base goes back to ``self.warm``."""
        stream = getattr(self, "stream", None)
        if stream is not None:
            stream.close()          # a build in progress stops after its block; the next attempt goes on
        model, self.model = self.model, None
        self.optimizer = None  # type: ignore[assignment]
        self.params, self.tracker = [], None
        if self.warm is not None and model is not None:
            try:
                if keep_base:
                    base = model.unload()
                    if any("lora_" in n for n, _ in base.named_parameters()):
                        raise RuntimeError("LoRA layers left after unload")
                    self.warm.keep(self.base_key, base)
                else:
                    self.warm.clear()
            except Exception:  # noqa: BLE001 - a base we cannot clean is dropped, never reused
                log.exception("could not take the adapter off the base; dropping the base")
                self.warm.clear()
        del model
        free_memory()
