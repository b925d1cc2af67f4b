"""The job's data: the file's token stream opened (a cache hit, or a build running in the
background, trainer/tokencache.py), its plan (trainer/plan.py), and the preparation's progress as
events: ``preparing`` (throttled) while it tokenizes, ``data_report`` once the whole file is done."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.atomic import sha256_file
from core.diskfull import is_disk_full
from trainer.data import REASON_TEXT, DataReport
from trainer.errors import JobFailed
from trainer.replay import MixedExamples, ReplaySet, save_pool
from trainer.tokencache import Subset, tokenizer_hash


class DataPrepMixin:
    """The data side of a run (trainer/recipe.py's ``_RecipeRun``): reads its job, cfg, layout and
    tokenizer; sets stream, plan, train_ex, eval_ex, ga, epochs, total_steps and data_cache."""

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
        self.replay = self._load_replay(sha)
        self.plan = StreamPlan(self.stream, max_length=int(cfg["max_length"]),
                               rows_per_batch=int(cfg["batch_size"]), packing=bool(cfg.get("packing", True)),
                               seed=int(cfg.get("seed", 0)), epochs=self.epochs, ga=self.ga,
                               eval_fraction=float(cfg.get("eval_fraction", 0.0)), on_wait=self._tokenizing,
                               eval_max=int(cfg.get("eval_max_examples") or 0) or None, replay=self.replay)
        self.train_ex = self.stream.data if self.replay is None else MixedExamples(self.stream.data, self.replay)
        first = self.plan.plan_next()
        if self.plan.n_windows == 1:                # a small file: its whole report before "started"
            self.stream.wait_complete(self._tokenizing)
        self._tokenizing()
        if first.batches == 0 and self.plan.n_windows == 1:
            raise JobFailed(f"{job.name}: no trainable examples ({self.report.to_json()})")
        self.data_ready()                           # N ranks: rank 0 tokenizes it all, then tells the others
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

    def report_json(self) -> dict[str, Any]:
        """The data report, with what replay mixed in (once the file is tokenized)."""
        out = self.report.to_json()
        if self.replay is not None and self.stream.complete:
            out["replay"] = self.replay.summary(self.plan.replay_total())
        return out

    def _load_replay(self, sha: str) -> "ReplaySet | None":
        """The replay pools of the last ``replay_datasets`` datasets current_model/ was trained on,
        when ``replay_fraction`` > 0 (trainer/replay.py)."""
        cfg = self.cfg
        fraction = float(cfg.get("replay_fraction") or 0.0)
        if fraction <= 0:
            return None
        lineage = [d.get("job_id") for d in (self.parent_state or {}).get("datasets") or []]
        ids = [j for j in dict.fromkeys(lineage) if isinstance(j, int) and j != self.job.job_id]
        ids = ids[-int(cfg.get("replay_datasets") or 0):] if int(cfg.get("replay_datasets") or 0) else []
        replay, notes = ReplaySet.load(self.layout, ids, tokenizer=tokenizer_hash(self.tokenizer),
                                       max_length=int(cfg["max_length"]), fraction=fraction,
                                       seed=int(cfg.get("seed", 0)), sha256=sha)
        for msg in notes:
            self.note(f"replay: {msg}", "warning")
        if replay is None:
            self.note(f"replay_fraction {fraction:g}: no earlier dataset has a replay pool yet; "
                      "this job trains on its file alone")
        else:
            self.note(f"replay: {fraction:.0%} of what this job trains comes from {len(replay.examples)} "
                      f"pooled examples of {len(set(replay.sources))} earlier dataset(s)")
        return replay

    def _save_replay_pool(self) -> None:
        """Keep a sample of this job's training examples for later jobs' replay."""
        limit = int(self.cfg.get("replay_pool_examples") or 0)
        if limit <= 0:
            return
        ea, eb = self.stream.data.examples_of(0, self.plan.n_train)
        try:
            save_pool(self.layout, {"job_id": self.job.job_id, "name": self.job.name, "sha256": self.job.sha256,
                                    "tokenizer": tokenizer_hash(self.tokenizer)},
                      Subset(self.stream.data, range(ea, eb)), limit=limit, seed=int(self.cfg.get("seed", 0)))
        except OSError as exc:
            if is_disk_full(exc):
                raise           # the disk, not the pool: the daemon pauses and the job resumes
            self.note(f"the replay pool of this job could not be written ({exc}); later jobs replay the "
                      "other datasets", "warning")

    def _tokenizing(self) -> None:
        """Progress of the background build: ``preparing`` events (throttled); once complete, the
        whole file's data report (``data_report`` event) and its bad lines in the log."""
        build = self.stream.build
        if build is not None and not build.complete:
            self._preparing("tokenizing", build.positions, build.total)
        elif not getattr(self, "_report_sent", True) and getattr(self, "plan", None) is not None:
            # once planned: a wait for the first block may see the build complete before the replay
            # set and the plan exist (a small file, a loaded CPU); _load_data sends it right after
            self._report_sent = True
            rep = self.report
            if build is not None:
                if self._prep_last_sent != ("tokenizing", build.total, build.total):
                    self._preparing("tokenizing", build.total, build.total)
                self.note(f"{self.job.name}: tokenized {build.total} lines in "
                          f"{time.monotonic() - build.t0:.1f} s ({rep.examples} examples, {rep.tokens} tokens)")
            self.emit("data_report", dataset=self.report_json())
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
