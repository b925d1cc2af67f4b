"""Replay: examples of earlier datasets mixed into each new job, so it forgets less.

* **Pools.** At the end of every job a seeded sample of its *training* examples (never its
  retention set), at most ``replay_pool_examples``, is kept as tokens in
  ``replay/job-<id>.npz`` (with the tokenizer that made them). Written once, atomically.
* **The draw.** A job with ``replay_fraction`` f > 0 reads the pools of the last
  ``replay_datasets`` datasets of the adapter it continues (current_model/'s lineage) and cycles
  through them in one seeded order (seed, this file's sha256): replay example p of the job is
  ``order[p % len(order)]``.
* **The mix.** Window w of epoch 0 with e_w examples of the file gets ``round(e_w * f / (1 - f))``
  replay examples, the next ones of that cycle, packed and shuffled with the window's own; later
  epochs repeat the replay examples of epoch 0. So f is the share of replay in what is trained,
  the plan stays a pure function of (file, pools, config) and exact resume holds.
* In the plan, replay example p has index ``REPLAY_BASE + p`` (``MixedExamples`` resolves it);
  the data report's ``replay`` section says how many were drawn from which dataset.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.atomic import atomic_write
from core.paths import Layout
from trainer.data import IGNORE_INDEX, Example

log = logging.getLogger(__name__)

REPLAY_BASE = 1 << 40        # plan indices at or above it are replay examples


def pool_path(layout: Layout, job_id: int) -> Path:
    return layout.home / "replay" / f"job-{int(job_id)}.npz"


def save_pool(layout: Layout, meta: dict[str, Any], examples: Sequence[Example], *, limit: int,
              seed: int) -> Path | None:
    """Keep a seeded sample of *examples* (at most *limit*) as the job's replay pool."""
    n = len(examples)
    if n == 0 or limit <= 0:
        return None
    rng = np.random.default_rng([int(seed), int(meta["job_id"]), 0x5E91A7])
    pick = np.sort(rng.choice(n, size=min(n, limit), replace=False)) if n > limit else np.arange(n)
    chosen = [examples[int(i)] for i in pick]
    ids = np.fromiter((t for e in chosen for t in e.input_ids), np.int64)
    mask = np.fromiter((lab != IGNORE_INDEX for e in chosen for lab in e.labels), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, ids=ids, mask=mask, ends=np.cumsum([len(e.input_ids) for e in chosen]).astype(np.int64),
             lines=np.array([e.line for e in chosen], np.int64), meta=np.array(json.dumps(meta)))
    path = pool_path(layout, meta["job_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    return path


def load_pool(path: Path) -> tuple[dict[str, Any], list[Example]] | None:
    """A pool's meta and examples; None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            ids, mask, ends, lines = z["ids"], z["mask"].astype(bool), z["ends"], z["lines"]
    except (OSError, ValueError, KeyError):
        return None
    out, start = [], 0
    for end, line in zip(ends.tolist(), lines.tolist()):
        seg = ids[start:end]
        out.append(Example(input_ids=seg.tolist(), labels=np.where(mask[start:end], seg, IGNORE_INDEX).tolist(),
                           line=int(line)))
        start = end
    return meta, out


class ReplaySet:
    """The pooled examples of earlier datasets, in the job's seeded cycle."""

    def __init__(self, examples: list[Example], sources: list[str], order: np.ndarray, fraction: float) -> None:
        self.examples, self.sources, self.order, self.fraction = examples, sources, order, fraction

    @classmethod
    def load(cls, layout: Layout, job_ids: Sequence[int], *, tokenizer: str, max_length: int, fraction: float,
             seed: int, sha256: str | None) -> tuple["ReplaySet | None", list[str]]:
        """The pools of *job_ids* made with *tokenizer* (examples over *max_length* left out), and a
        note for every pool that cannot be used."""
        examples: list[Example] = []
        sources: list[str] = []
        notes: list[str] = []
        for job_id in job_ids:
            loaded = load_pool(pool_path(layout, job_id))
            if loaded is None:
                notes.append(f"job {job_id}: no replay pool (trained before replay pools, or unreadable)")
                continue
            meta, pool = loaded
            if meta.get("tokenizer") != tokenizer:
                notes.append(f"job {job_id} ({meta.get('name')}): its replay pool was made with another tokenizer")
                continue
            kept = [e for e in pool if len(e) <= max_length]
            examples.extend(kept)
            sources.extend([str(meta.get("name") or f"job {job_id}")] * len(kept))
        if not examples:
            return None, notes
        key = int((sha256 or "0")[:15], 16)
        order = np.random.default_rng([int(seed), key, 0x7E91A7]).permutation(len(examples))
        return cls(examples, sources, order, fraction), notes

    def count_for(self, n_examples: int) -> int:
        """Replay examples mixed with *n_examples* of the file: they make ``fraction`` of the mix."""
        return int(round(n_examples * self.fraction / (1.0 - self.fraction)))

    def example(self, p: int) -> Example:
        return self.examples[int(self.order[p % len(self.order)])]

    def lengths(self, a: int, b: int) -> list[int]:
        return [len(self.example(p)) for p in range(a, b)]

    def summary(self, used: int) -> dict[str, Any]:
        """For the data report: how many replay examples (and trained tokens) came from which dataset."""
        by: dict[str, int] = {}
        tokens = 0
        for p in range(used):
            i = int(self.order[p % len(self.order)])
            by[self.sources[i]] = by.get(self.sources[i], 0) + 1
            tokens += self.examples[i].num_trained
        return {"fraction": self.fraction, "examples": used, "trained_tokens": tokens,
                "pool_examples": len(self.examples), "datasets": by}


class MixedExamples(Sequence[Example]):
    """The file's examples, and the replay examples at ``REPLAY_BASE + p``."""

    def __init__(self, data: Sequence[Example], replay: ReplaySet) -> None:
        self.data, self.replay = data, replay

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Example:   # type: ignore[override]
        return self.replay.example(i - REPLAY_BASE) if i >= REPLAY_BASE else self.data[i]
