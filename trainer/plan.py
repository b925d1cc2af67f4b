"""The job's data plan over a token stream: training starts on the first window of the file while
the rest is tokenized, and the plan stays a pure function of (file, config) for exact resume.

* Positions (trainer/tokencache.py: the file's lines in a seeded random order) ``[0, n_train)``
  are trained, ``[n_train, n)`` are held out for eval (``eval_fraction`` of the lines, at most
  ``eval_max_examples``): the file's retention set (trainer/retention_eval.py).
* Epoch 0 is planned window by window: window w is positions ``[w*W, (w+1)*W)``, packed and
  shuffled on its own (trainer/packing.py), planned once those positions are tokenized. The
  positions are already a random sample of the file, so the order stays shuffled file-wide.
* Later epochs are planned over all training examples at once (the cache is complete by then).
* A step never spans two segments (a window, or a later epoch); the learning-rate schedule
  follows the fraction of the job done, ``F(step)``, so it needs no total step count before the
  file is tokenized: with one segment (a small file) it is exactly the step-based schedule.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable

from trainer.packing import plan_batches
from trainer.replay import REPLAY_BASE, ReplaySet
from trainer.tokencache import Subset, TokenStream

WINDOW = 4096       # positions (lines) per epoch-0 window


@dataclass
class Segment:
    epoch: int
    first_batch: int     # in its epoch's plan
    batches: int
    first_step: int
    steps: int
    f0: float            # fraction of the job done at its start and end
    f1: float


class StreamPlan:
    def __init__(self, stream: TokenStream, *, max_length: int, rows_per_batch: int, packing: bool, seed: int,
                 epochs: int, ga: int, eval_fraction: float, on_wait: Callable[[], None] | None = None,
                 window: int | None = None, eval_max: int | None = None, replay: ReplaySet | None = None) -> None:
        self.stream, self.max_length, self.rows, self.packing = stream, max_length, rows_per_batch, packing
        self.seed, self.epochs, self.ga, self.on_wait = seed, epochs, ga, on_wait
        self.window = window or WINDOW
        n = stream.total
        self.n = n
        self.n_eval = min(max(1, round(n * eval_fraction)), n - 1, eval_max or n) \
            if eval_fraction > 0 and n >= 2 else 0
        self.n_train = n - self.n_eval
        self.n_windows = max(1, math.ceil(self.n_train / self.window))
        self.plans: list[list[list[list[int]]]] = [[] for _ in range(epochs)]
        self.segments: list[Segment] = []
        self.replay, self.replay_used = replay, 0      # replay examples planned into epoch 0 so far

    # ------------------------------------------------------------------ planning
    @property
    def n_segments(self) -> int:
        return self.n_windows + self.epochs - 1

    @property
    def all_planned(self) -> bool:
        return len(self.segments) == self.n_segments

    def _wait(self, positions: int) -> None:
        self.stream.wait(positions, self.on_wait)

    def plan_next(self) -> Segment:
        k = len(self.segments)
        data = self.stream.data
        if k < self.n_windows:                           # epoch 0, window k
            epoch, pa, pb = 0, k * self.window, min((k + 1) * self.window, self.n_train)
            self._wait(pb)
            ea, eb = data.examples_of(pa, pb)
            salt = f"w{k}" if self.n_windows > 1 else ""
            share = max(self.n_train, 1) * self.epochs          # F by lines done: windows are equal in lines
            f0, f1 = pa / share, pb / share
            ra = self.replay_used
            self.replay_used += self.replay.count_for(eb - ea) if self.replay else 0
        else:                                            # a later epoch, all training examples
            epoch = k - self.n_windows + 1
            self._wait(self.n)
            ea, eb = data.examples_of(0, self.n_train)
            salt, f0, f1 = "", epoch / self.epochs, (epoch + 1) / self.epochs
            ra = 0                                       # ... and epoch 0's replay examples again
        lengths = data.lengths(ea, eb).tolist()
        idx = list(range(ea, eb))
        if self.replay is not None and self.replay_used > ra:
            lengths += self.replay.lengths(ra, self.replay_used)
            idx += range(REPLAY_BASE + ra, REPLAY_BASE + self.replay_used)
        batches = [[[idx[i] for i in row] for row in batch]
                   for batch in plan_batches(lengths, max_length=self.max_length, rows_per_batch=self.rows,
                                             packing=self.packing, seed=self.seed, epoch=epoch, salt=salt)]
        plan = self.plans[epoch]
        first_step = self.segments[-1].first_step + self.segments[-1].steps if self.segments else 0
        seg = Segment(epoch, len(plan), len(batches), first_step, math.ceil(len(batches) / self.ga), f0, f1)
        plan.extend(batches)
        self.segments.append(seg)
        return seg

    def _segment_of_batch(self, epoch: int, b: int) -> Segment | None:
        """The segment holding batch b of *epoch*, planning as far as needed; None past the end."""
        while True:
            for seg in self.segments:
                if seg.epoch == epoch and seg.first_batch <= b < seg.first_batch + seg.batches:
                    return seg
            if self.all_planned or (self.segments and self.segments[-1].epoch > epoch):
                return None
            self.plan_next()

    def group(self, epoch: int, b: int) -> list[list[list[int]]] | None:
        """The micro-batches of the step starting at batch b of *epoch*; None when the epoch is done."""
        seg = self._segment_of_batch(epoch, b)
        if seg is None:
            return None
        return self.plans[epoch][b:min(b + self.ga, seg.first_batch + seg.batches)]

    # ------------------------------------------------------------------ progress and schedule
    def fraction(self, step: int) -> float:
        """F(step): the fraction of the job done before *step* (planning ahead if need be)."""
        while True:
            if self.segments:
                last = self.segments[-1]
                if step < last.first_step + last.steps:
                    i = bisect.bisect_right([s.first_step for s in self.segments], step) - 1
                    seg = self.segments[max(i, 0)]
                    if seg.steps == 0:
                        return seg.f1
                    return seg.f0 + (seg.f1 - seg.f0) * (step - seg.first_step) / seg.steps
            if self.all_planned:
                return 1.0
            self.plan_next()

    def total_steps(self) -> int:
        """Exact once every segment is planned; until then an estimate from the planned windows."""
        planned = sum(s.steps for s in self.segments)
        if self.all_planned:
            return planned
        windows = [s.steps for s in self.segments if s.epoch == 0]
        per_window = sum(windows) / len(windows) if windows else 0.0
        epoch0 = sum(windows) + per_window * (self.n_windows - len(windows))
        later = sum(s.steps for s in self.segments if s.epoch > 0)
        missing_epochs = self.epochs - 1 - len([s for s in self.segments if s.epoch > 0])
        return int(round(epoch0 + later + missing_epochs * epoch0 * self.n_train / max(self.n_train, 1)))

    def epoch_progress(self, epoch: int, b: int) -> float:
        seg = self._segment_of_batch(epoch, max(b - 1, 0))
        if seg is None or seg.batches == 0:
            return float(epoch + 1)
        within = (b - seg.first_batch) / seg.batches
        return (seg.f0 + (seg.f1 - seg.f0) * within) * self.epochs

    def replay_total(self) -> int:
        """Replay examples in epoch 0 (each later epoch repeats them), once the file is tokenized."""
        if self.replay is None:
            return 0
        self._wait(self.n)
        data = self.stream.data
        total = 0
        for w in range(self.n_windows):
            ea, eb = data.examples_of(w * self.window, min((w + 1) * self.window, self.n_train))
            total += self.replay.count_for(eb - ea)
        return total

    def eval_examples(self) -> Subset:
        self._wait(self.n)
        ea, eb = self.stream.data.examples_of(self.n_train, self.n)
        return Subset(self.stream.data, range(ea, eb))


def lr_factor(kind: str, warmup: int, fraction: Callable[[int], float]) -> Callable[[int], float]:
    """The LambdaLR factor at a step: warmup in steps, then ``kind`` over the fraction of the job
    done after warmup (transformers' formulas when F(step) = step / total)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        fw = fraction(warmup) if warmup else 0.0
        progress = min(1.0, max(0.0, (fraction(step) - fw) / max(1e-12, 1.0 - fw)))
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return max(0.0, 1.0 - progress)
    return factor

