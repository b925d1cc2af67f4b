"""The in-process QLoRA recipe: one dataset, trained into the continuous adapter.

Reads top to bottom like a torchtune recipe:

    setup()            config, base (located + fingerprinted + locked), data, plan, model + LoRA,
                       optimizer, scheduler, resume from the newest valid checkpoint
    train()            optimizer steps; after each: events, layer activity, eval at epoch end,
                       periodic checkpoint, control (pause / resume / skip / stop)
    save_checkpoint()  atomic step-<n>/ folder with everything exact resume needs
    finish()           final checkpoint, current_model/ swap, snapshot, checkpoints removed
    cleanup()          free the model

One optimizer step = ``gradient_accumulation`` micro-batches of ``batch_size`` packed rows; the
loss is the summed token cross-entropy divided by the trained-token count of the whole step, so
splitting a batch into smaller micro-batches (OOM back-off) computes the same step.

Exact resume: the data plan is a pure function of (seed, epoch) (trainer/packing.py), so a
checkpoint stores only the position (epoch, batch index); with the adapter, AdamW state,
scheduler and every RNG (python, numpy, torch, cuda) restored, the continued run is the
uninterrupted run (bitwise on CPU).
"""
from __future__ import annotations

import collections
import json
import logging
import math
import random
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic import sha256_file
from core.config import LOCKED_KEYS
from core.interface import Command, ControlSource, EventSink, JobResult, JobSpec, Outcome
from core.paths import Layout
from trainer import adapter_store
from trainer.checkpoint import (CheckpointManager, CheckpointPayload, capture_rng_state, restore_rng_state,
                                save_torch)
from trainer.data import REASON_TEXT, DataReport
from trainer.layer_activity import LayerActivityTracker
from trainer.model import (FINGERPRINT_CACHE_NAME, PRECISIONS, BaseMismatchError, BaseModelError, attach_lora,
                           base_fingerprint, check_same_base, enable_tf32, load_adapter_state,
                           load_base_model, load_tokenizer, pick_device, resolve_base_path, resolve_precision,
                           save_adapter, trainable_parameters, want_gradient_checkpointing)
from trainer.warm import WarmBase

log = logging.getLogger("trainer.recipe")

# Keys that define what a job computes: a resumed job keeps the values it started with (a config
# edit applies to the next job), so its continuation is exact.
TRAINING_KEYS = ("base_model", "model_name", "max_length", "batch_size", "gradient_accumulation",
                 "use_qlora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                 "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay", "max_grad_norm",
                 "epochs", "seed", "truncation", "eval_fraction", "packing", "attn_implementation",
                 "precision")
PAUSE_WAIT_S = 3600.0


class JobFailed(Exception):
    """A clear, expected failure: the job ends FAILED with this message."""


class _Finished(Exception):
    """Raised inside setup when the job needs no training (already completed)."""

    def __init__(self, result: JobResult) -> None:
        super().__init__(result.reason)
        self.result = result


class _OOM(Exception):
    """Out of memory inside optimizer.step: its state may be half updated, so the job goes back
    to its last checkpoint (an OOM in forward/backward only redoes that step)."""


class _StepFailed(Exception):
    def __init__(self, result: JobResult) -> None:
        super().__init__(result.reason)
        self.result = result


OOM_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


def free_memory() -> None:
    """Return cached blocks to the GPU after an OOM (call it outside the ``except`` block: the
    traceback holds the failed step's activations until the block ends)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _rss_bytes() -> int:
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0


def _lineage(state: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies one version of current_model/: its datasets in order and when it was written."""
    return (tuple((d.get("job_id"), d.get("sha256")) for d in state.get("datasets") or []),
            state.get("total_steps"), state.get("updated_at"))


def _describe_lineage(state: dict[str, Any]) -> str:
    ds = state.get("datasets") or []
    if not ds:
        return "no adapter"
    return f"{len(ds)} dataset(s), last {ds[-1].get('name')} (job {ds[-1].get('job_id')})"


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> Any:
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, max(total, 1))
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, max(total, 1))
    return get_constant_schedule_with_warmup(optimizer, warmup)


class QLoRATrainer:
    """Trainer protocol, in process. The worker (trainer/worker.py) wraps it for the daemon."""

    name = "qlora"

    def __init__(self, warm: "WarmBase | None" = None) -> None:
        self.warm = warm        # a warm worker's loaded base, kept between jobs (trainer/warm.py)

    def run(self, job: JobSpec, sink: EventSink, control: ControlSource) -> JobResult:
        r = _RecipeRun(job, sink, control, self.warm)
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
            r.cleanup(keep_base)


class _RecipeRun:
    def __init__(self, job: JobSpec, sink: EventSink, control: ControlSource,
                 warm: "WarmBase | None" = None) -> None:
        self.job, self.sink, self.control, self.warm = job, sink, control, warm
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

    # ================================================================== helpers
    def emit(self, event: str, **fields: Any) -> None:
        self.sink.emit({"event": event, **fields})

    def note(self, message: str, level: str = "info") -> None:
        getattr(log, "warning" if level == "warning" else "info")(message)
        self.emit("log", level=level, message=message)

    # ================================================================== setup
    def setup(self) -> None:
        job, cfg = self.job, self.cfg
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
        self._load_data()
        self.stream.hold(True)      # the rest of the file waits while the model loads (CPU, GIL)

        # --- model: base (4-bit) + LoRA from checkpoint / current_model / fresh
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
            base_model = load_base_model(self.base, use_qlora=use_qlora, device=self.device,
                                         attn_implementation=attn, gradient_checkpointing=gc_on,
                                         precision=self.precision)
        else:
            self.note(f"base already loaded ({self.precision}); attaching this job's adapter")
        adapter_src = payload.path if payload is not None else cur_dir
        torch.manual_seed(seed)     # a fresh LoRA starts the same whether the base was loaded now or before
        self.model = attach_lora(base_model, cfg, adapter_src)
        self.model.train()
        self.params = trainable_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=float(cfg.get("learning_rate", 2e-4)),
                                           weight_decay=float(cfg.get("weight_decay", 0.0)))
        self.scheduler = self._make_scheduler()
        # fp16 needs loss scaling (its range is too small for gradients); bf16 and fp32 do not
        self.scaler = self._new_scaler()
        self.micro_rows = int(cfg["batch_size"])
        if payload is not None:
            self._restore(payload)
        else:
            self._initial = (self._adapter_copy(), capture_rng_state())
        self.tracker = LayerActivityTracker(self.model)
        self.stream.hold(False)
        n_train = sum(p.numel() for p in self.params)
        self.note(f"{len(self.tracker.modules)} LoRA modules, {n_train} trainable parameters; "
                  f"{self.total_steps} steps ({self.plan_sizes} micro-batches per epoch)")
        self.emit("started", total_steps=self.total_steps, resumed_from_step=self.step,
                  dataset=self.report.to_json(), data_cache=self.data_cache, base_model=str(self.base),
                  base_fingerprint=self.fingerprint, device=str(self.device),
                  continued_from=("checkpoint" if payload is not None else
                                  "current_model" if cur_dir is not None else "fresh"))
        self.t_start = time.monotonic()

    def _make_scheduler(self) -> Any:
        """The LR schedule over the fraction of the job done (trainer/plan.py): it needs no
        total step count before the file is tokenized."""
        from trainer.plan import lr_factor

        factor = lr_factor(str(self.cfg.get("lr_scheduler", "cosine")), int(self.cfg.get("warmup_steps", 0)),
                           self.plan.fraction)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: factor(step))

    def _restart(self, why: str) -> None:
        """This job's checkpoints cannot be continued: start it again from current_model/."""
        self.note(f"job {self.job.job_id}: {why}; restarting this job from the current adapter "
                  "(its old checkpoints are removed)", "warning")
        self.emit("restarted", reason=why)
        self.ckpts.remove_all()

    def _check_checkpoint(self, payload: CheckpointPayload) -> CheckpointPayload | None:
        """The checkpoint if it continues what current_model/ holds now, else None (restart).

        A checkpoint extends the adapter its job started from. If current_model/ has moved on
        since (another job finished, a consolidation made a new base and a fresh adapter), going
        on from the checkpoint and publishing would erase that training: the job restarts from
        the current adapter instead, so lineage stays [..., the other job, this job].
        """
        st = payload.state
        try:
            check_same_base(f"checkpoint {payload.path}", st.get("base_model"), st.get("base_fingerprint"),
                            self.base, self.fingerprint)
        except BaseMismatchError as exc:
            self._restart(f"its checkpoint is on another base ({exc})")
            return None
        if _lineage(st.get("parent_state") or {}) != _lineage(self.parent_state):
            self._restart("current_model/ changed since its checkpoint was written (now "
                          f"{_describe_lineage(self.parent_state)}, then "
                          f"{_describe_lineage(st.get('parent_state') or {})})")
            return None
        if st.get("dataset_sha256") != self.job.sha256:
            self._restart(f"its checkpoints in {self.ckpts.root} belong to another dataset "
                          f"({str(st.get('dataset_sha256'))[:12]})")
            return None
        saved = st.get("config") or {}
        changed = {k: (saved[k], self.cfg.get(k)) for k in TRAINING_KEYS
                   if k in saved and saved[k] != self.cfg.get(k)}
        if changed:
            self.note("config changed since this job started; the job keeps its original values "
                      "(changes apply to the next job): "
                      + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in changed.items()), "warning")
            self.cfg.update({k: saved[k] for k in changed})
        return payload

    def _load_data(self) -> None:
        """Open the file's token stream (the cache, or a build of it running in the background)
        and plan its first window: training starts before the whole file is tokenized."""
        from trainer import tokencache
        from trainer.plan import StreamPlan

        cfg, job = self.cfg, self.job
        sha = job.sha256 or sha256_file(Path(job.dataset))
        self._preparing("validating", 0, 0)
        self.stream = tokencache.open_stream(job.dataset, self.tokenizer, cache_root=self.layout.token_cache,
                                             sha256=sha, max_length=int(cfg["max_length"]),
                                             truncation=str(cfg.get("truncation", "keep_answer")),
                                             seed=int(cfg.get("seed", 0)))
        self.ga = int(cfg["gradient_accumulation"])
        self.epochs = int(cfg.get("epochs", 1))
        self._report_sent = False
        self.stream.wait(1, self._tokenizing)       # the line count is known after the first block
        self.plan = StreamPlan(self.stream, max_length=int(cfg["max_length"]),
                               rows_per_batch=int(cfg["batch_size"]), packing=bool(cfg.get("packing", True)),
                               seed=int(cfg.get("seed", 0)), epochs=self.epochs, ga=self.ga,
                               eval_fraction=float(cfg.get("eval_fraction", 0.0)), on_wait=self._tokenizing)
        self.train_ex = self.stream.data
        first = self.plan.plan_next()
        if self.plan.n_windows == 1:                # a small file: its whole report before "started"
            self.stream.wait_complete(self._tokenizing)
        self._tokenizing()
        if first.batches == 0 and self.plan.n_windows == 1:
            raise JobFailed(f"{job.name}: no trainable examples ({self.report.to_json()})")
        self.eval_ex: Any = None                    # planned at the first eval (the held-out lines)
        self.total_steps = self.plan.total_steps()
        self.plan_sizes = [len(p) for p in self.plan.plans]
        hit = self.stream.hit
        self.data_cache = {"path": str(self.stream.dest), "hit": hit, "lines": self.plan.n,
                           "continued_from_position": 0 if hit else self.stream.build.resumed_from}
        self.note(f"{job.name}: " + (f"token cache hit {self.stream.dest.name}" if hit else
                                     f"tokenizing {self.plan.n} lines into {self.stream.dest.name} in the "
                                     f"background; training starts on the first {self.plan.window} lines"))

    @property
    def report(self) -> "DataReport":
        return self.stream.report

    def _tokenizing(self) -> None:
        """Progress of the background build: ``preparing`` events (throttled); once complete, the
        whole file's data report (``data_report`` event) and its bad lines in the log."""
        build = self.stream.build
        if build is not None and not build.complete:
            self._preparing("tokenizing", build.positions, build.total)
        elif not getattr(self, "_report_sent", True):
            self._report_sent = True
            rep = self.report
            if build is not None:
                if self._prep_last_sent != ("tokenizing", build.total, build.total):
                    self._preparing("tokenizing", build.total, build.total)
                self.note(f"{self.job.name}: tokenized {build.total} lines in "
                          f"{time.monotonic() - build.t0:.1f} s ({rep.examples} examples, {rep.tokens} tokens)")
            self.emit("data_report", dataset=rep.to_json())
            if rep.bad_records:
                self.note(f"{self.job.name}: {rep.bad_records} of {rep.records + rep.bad_records} records are "
                          "not trained (bad records): "
                          + ", ".join(f"{k} {r['count']} (lines {', '.join(map(str, r['lines'][:5]))})"
                                      for k, r in rep.reasons.items() if k not in REASON_TEXT), "warning")

    PREPARING_EVERY_S = 0.5
    PREPARING_SAME_S = 2.0

    def _preparing(self, phase: str, done: int, total: int) -> None:
        """Data preparation as progress (``preparing`` events, at most every PREPARING_EVERY_S and
        at the end; unchanged progress again every PREPARING_SAME_S): the daemon shows it, and the
        worker is never taken for hung meanwhile."""
        now = time.monotonic()
        if (phase, done, total) == self._prep_last_sent and now - self._prep_last < self.PREPARING_SAME_S:
            return                  # unchanged (a block is being tokenized): repeated now and then
        if phase != self._prep_phase:
            self._prep_t0, self._prep_phase, self._prep_last = now, phase, 0.0
        elif done < total and now - self._prep_last < self.PREPARING_EVERY_S:
            return
        self._prep_last, self._prep_last_sent = now, (phase, done, total)
        elapsed = now - self._prep_t0
        rate = done / elapsed if elapsed > 0 and done else None
        self.emit("preparing", phase=phase, done=done, total=total,
                  percent=round(100.0 * done / total, 1) if total else None,
                  records_per_second=round(rate, 1) if rate else None,
                  eta_seconds=round((total - done) / rate, 1) if rate and total else None)

    def _adapter_copy(self) -> dict[str, torch.Tensor]:
        from trainer.model import adapter_state_dict
        return {k: v.clone() for k, v in adapter_state_dict(self.model).items()}

    def _restore(self, payload: CheckpointPayload) -> None:
        """Everything exact resume needs, from a loaded checkpoint."""
        st = payload.state
        load_adapter_state(self.model, payload.adapter_state)
        self.optimizer.load_state_dict(payload.optimizer)
        self.scheduler.load_state_dict(payload.scheduler)
        if st.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(st["grad_scaler"])
        restore_rng_state(payload.rng)
        self.step = int(st["step"])
        self.epoch, self.batch_index = int(st["epoch"]), int(st["batch_index"])
        self.micro_rows = int(st.get("micro_rows", self.micro_rows))
        self.last_loss = st.get("last_loss")
        self.eval_loss = st.get("eval_loss")
        self.nonfinite_total = int(st.get("nonfinite_steps") or 0)
        self.note(f"resumed from {payload.path} (step {self.step}, epoch {self.epoch}, "
                  f"batch {self.batch_index})")

    # ================================================================== train
    def train(self) -> JobResult | None:
        """Run the remaining steps. Returns a JobResult when stopped/skipped/failed, else None."""
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
                if epoch_end and self.plan.n_eval:
                    ev = self.evaluate()
                    self.eval_loss = ev if math.isfinite(ev) else None
                    if self.eval_loss is None:
                        self.note(f"eval loss at step {self.step} is not finite ({ev})", "warning")
                    self.emit("eval", step=self.step, eval_loss=self.eval_loss, epoch=epoch + 1)
                if self.step % every_ckpt == 0 and not (epoch_end and epoch == self.epochs - 1):
                    self.save_checkpoint("periodic")
                outcome = self._control()
                if outcome is not None:
                    return outcome
        if self.step == 0:
            raise JobFailed(f"{self.job.name}: no trainable examples ({self.report.to_json()})")
        return None

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
        n_trained = sum(m.num_trained_tokens for m in micro)
        n_tokens = sum(m.num_tokens for m in micro)
        denom = max(n_trained, 1)
        total = torch.zeros((), device=self.device)
        oom = False
        try:
            for m in micro:
                m = m.to(self.device, non_blocking=True)
                loss_sum = self._loss_sum(m)
                self.scaler.scale(loss_sum / denom).backward()
                total += loss_sum.detach()            # one host sync per step, not per micro-batch
                del loss_sum
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

    def evaluate(self) -> float:
        """Mean token loss on the held-out lines; out of memory halves its rows and starts it over."""
        rows = self.micro_rows
        while True:
            oom = False
            try:
                return self._evaluate(rows)
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
    def _evaluate(self, rows: int) -> float:
        from trainer.packing import make_batches

        self.model.eval()
        try:
            if self.eval_ex is None:
                self.eval_ex = self.plan.eval_examples()
            if not len(self.eval_ex):
                return float("nan")
            batches = make_batches(self.eval_ex, max_length=int(self.cfg["max_length"]),
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

    def _control(self) -> JobResult | None:
        """Obey the control source at a step boundary."""
        cmd = self.control.poll()
        while cmd is Command.PAUSE:
            self.save_checkpoint("pause")
            self.emit("paused", step=self.step)
            self.note(f"paused at step {self.step}")
            cmd = self.control.wait(PAUSE_WAIT_S)
            while cmd is None or cmd is Command.PAUSE:
                cmd = self.control.wait(PAUSE_WAIT_S)
            if cmd is Command.RESUME:
                self.emit("resumed", step=self.step)
                self.note(f"resumed at step {self.step}")
                cmd = self.control.poll()
        if cmd is Command.SKIP:
            self.save_checkpoint("skip")
            return JobResult(Outcome.SKIPPED, reason="skipped", steps=self.step)
        if cmd is Command.STOP:
            self.save_checkpoint("stop")
            return JobResult(Outcome.STOPPED, reason="stopped", steps=self.step)
        return None

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
            self.optimizer.state.clear()
            self.scheduler = self._make_scheduler()
            restore_rng_state(rng)
            self.step = self.epoch = self.batch_index = 0
        self.micro_rows = micro
        return None

    # ================================================================== checkpoints
    def _state(self, reason: str) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "epoch": self.epoch,
                "batch_index": self.batch_index, "micro_rows": self.micro_rows,
                "job_id": self.job.job_id, "dataset": self.job.name, "dataset_sha256": self.job.sha256,
                "base_model": str(self.base), "base_fingerprint": self.fingerprint,
                "locked": {k: self.cfg.get(k) for k in LOCKED_KEYS},
                "config": {k: self.cfg.get(k) for k in TRAINING_KEYS},
                "last_loss": self.last_loss, "eval_loss": self.eval_loss,
                "nonfinite_steps": self.nonfinite_total,
                "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "parent_state": self.parent_state, "reason": reason, "saved_at": _now()}

    def save_checkpoint(self, reason: str) -> Path:
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
    def _trainer_state(self) -> dict[str, Any]:
        parent = self.parent_state or {}
        entry = {"name": self.job.name, "sha256": self.job.sha256, "job_id": self.job.job_id,
                 "steps": self.step, "final_loss": self.last_loss, "eval_loss": self.eval_loss,
                 "examples": self.report.examples, "trained_tokens": self.report.trained_tokens,
                 "completed_at": _now()}
        peft_cfg = self.model.peft_config["default"]
        targets = peft_cfg.target_modules
        return {"base_model": str(self.base), "base_fingerprint": self.fingerprint,
                "datasets": list(parent.get("datasets") or []) + [entry],
                "total_steps": int(parent.get("total_steps") or 0) + self.step,
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

    def finish(self) -> JobResult:
        self.stream.wait_complete(self._tokenizing)         # the whole file's data report
        self._tokenizing()
        self._check_adapter_finite()
        self.save_checkpoint("final")
        state = self._trainer_state()
        try:
            cur = adapter_store.publish_current(Path(self.job.home), lambda d: save_adapter(self.model, d),
                                                state)
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
            "data": self.report.to_json(), "train_seconds": round(elapsed, 3),
            "nonfinite_steps": self.nonfinite_total})

    def _snapshot_meta(self, entry: dict[str, Any]) -> dict[str, Any]:
        return {"job_id": self.job.job_id, "dataset": self.job.name, "dataset_sha256": self.job.sha256,
                "steps": entry.get("steps"), "final_train_loss": entry.get("final_loss"),
                "eval_loss": entry.get("eval_loss"), "base_model": str(self.base),
                "base_fingerprint": self.fingerprint,
                "data_report": self.report.to_json() if getattr(self, "report", None) else None}

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
