"""A preparation longer than the hang limit is progress, not a hang (issue 10, item 2): the
worker reports tokenizing as ``preparing`` events, and the SubprocessTrainer's hang detector
counts every event. The limit is set from this machine's own speed so the preparation really
outlasts it."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from core.config import Config, config_to_dict
from trainer.data import load_examples
from core.interface import Command, Outcome
from daemon.subprocess_trainer import SubprocessTrainer
from trainer.train import make_job
from test_worker import ListControl, Recorder

REPO = Path(__file__).resolve().parents[2]
WORDS = "the mill river stone bread water light small over under".split()


def _records(n: int, words: int) -> list[dict[str, Any]]:
    text = lambda k, i: " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] + str(j % 13) for j in range(k))  # noqa: E731
    return [{"messages": [{"role": "user", "content": text(words // 4, i)},
                          {"role": "assistant", "content": text(words, i + 1)}]} for i in range(n)]


@pytest.mark.slow
def test_a_preparation_longer_than_the_hang_limit_is_not_killed(tiny_base: Path, tmp_path: Path) -> None:
    # the limit: comfortably above the worker's silent start (interpreter + torch import)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import trainer.recipe"], cwd=REPO, check=True)
    limit = max(3.0, 1.5 * (time.monotonic() - t0) + 1.0)
    # the file: one window (< 4096 lines) whose tokenizing takes about 1.5 limits here
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in _records(100, 600)), encoding="utf-8")
    t0 = time.monotonic()
    load_examples(sample, _tokenizer(tiny_base), max_length=256)
    per_record = (time.monotonic() - t0) / 100
    n = min(4000, int(1.5 * limit / per_record) + 1)
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(n, 600)), encoding="utf-8")

    cfg = config_to_dict(Config(base_model=str(tiny_base), max_length=256, batch_size=2, lora_r=4,
                                checkpoint_every_steps=1000, worker_timeout_s=limit))
    control = ListControl()
    seen: list[tuple[float, str]] = []

    def on_event(ev: dict[str, Any]) -> None:
        seen.append((time.monotonic(), ev["event"]))
        if ev["event"] == "step":
            control.pending.append(Command.STOP)

    result = SubprocessTrainer().run(make_job(data, tmp_path / "home", cfg, job_id=1), Recorder(on_event), control)
    assert result.outcome is Outcome.STOPPED, result.reason
    prep = [t for t, k in seen if k == "preparing"]
    started = next(t for t, k in seen if k == "started")
    if started - prep[0] <= limit:
        pytest.skip(f"this machine tokenized {n} records in under {limit:.1f} s")
    assert started - prep[0] > limit                       # preparing outlasted the hang limit...
    gaps = [b - a for a, b in zip(prep, prep[1:])]
    assert max(gaps) < limit                               # ...as a steady trail of progress


def _tokenizer(base: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(base)
