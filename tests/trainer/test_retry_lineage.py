"""A retry never erases other datasets' training (issue 9, item 1).

Job A stops part-way (a checkpoint), job B completes, A runs again: A's checkpoint extends an
adapter that no longer is current_model/, so A restarts from the current adapter (B's) and the
lineage ends [..., B, A]. Without B in between, A resumes from its checkpoint as before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from core.config import Config, config_to_dict
from daemon.generator import generate_records
from core.interface import Outcome
from trainer.recipe import QLoRATrainer
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl, StopAfter

pytestmark = pytest.mark.slow


def cfg(base: Path) -> dict[str, Any]:
    return config_to_dict(Config(base_model=str(base), max_length=64, batch_size=2, gradient_accumulation=1,
                                 lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3,
                                 lr_scheduler="constant", checkpoint_every_steps=1000, seed=0))


def dataset(path: Path, n: int, seed: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_records(n, seed=seed)), encoding="utf-8")
    return path


def run(job: Any, stop_at: int | None = None) -> tuple[Any, ListSink]:
    sink = ListSink()
    control = StopAfter(sink, stop_at) if stop_at else NoControl()
    return QLoRATrainer().run(job, sink, control), sink


def lineage(home: Path) -> list[str]:
    state = json.loads((home / "current_model" / "trainer_state.json").read_text())
    return [d["name"] for d in state["datasets"]]


def test_retry_after_another_job_completed_restarts_and_keeps_its_training(tiny_base: Path,
                                                                           tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = dataset(tmp_path / "first.jsonl", 12, seed=1)
    a = dataset(tmp_path / "a.jsonl", 24, seed=2)
    b = dataset(tmp_path / "b.jsonl", 12, seed=3)
    assert run(make_job(first, home, cfg(tiny_base), job_id=1))[0].outcome is Outcome.COMPLETED

    job_a = make_job(a, home, cfg(tiny_base), job_id=2)
    stopped, _ = run(job_a, stop_at=3)
    assert stopped.outcome is Outcome.STOPPED and (home / "checkpoints/job-2/step-3").is_dir()
    done_b, _ = run(make_job(b, home, cfg(tiny_base), job_id=3))
    assert done_b.outcome is Outcome.COMPLETED
    assert lineage(home) == ["first.jsonl", "b.jsonl"]
    b_weights = load_file(str(home / "current_model/adapter_model.safetensors"))

    result, sink = run(job_a)                       # the retry
    assert result.outcome is Outcome.COMPLETED, result.reason
    (ev,) = sink.of("restarted")
    assert "current_model/ changed since its checkpoint was written" in ev["reason"]
    assert "now 2 dataset(s), last b.jsonl (job 3)" in ev["reason"]
    assert "then 1 dataset(s), last first.jsonl (job 1)" in ev["reason"]
    assert any(e["level"] == "warning" and "restarting this job from the current adapter" in e["message"]
               for e in sink.of("log"))
    started = sink.of("started")[0]
    assert started["resumed_from_step"] == 0 and started["continued_from"] == "current_model"
    assert [s["step"] for s in sink.of("step")] == list(range(1, result.steps + 1))
    assert lineage(home) == ["first.jsonl", "b.jsonl", "a.jsonl"]
    # A trained on top of B: B's weights are the start, so the adapter moved from them
    a_weights = load_file(str(home / "current_model/adapter_model.safetensors"))
    assert any(not a_weights[k].equal(b_weights[k]) for k in b_weights)
    assert not (home / "checkpoints/job-2").exists()

    # the same retry again does nothing twice: A is the last dataset already
    again, sink2 = run(job_a)
    assert again.outcome is Outcome.COMPLETED and not sink2.of("step")
    assert lineage(home) == ["first.jsonl", "b.jsonl", "a.jsonl"]


def test_a_checkpoint_on_the_same_current_model_is_resumed(tiny_base: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = dataset(tmp_path / "first.jsonl", 12, seed=1)
    a = dataset(tmp_path / "a.jsonl", 24, seed=2)
    assert run(make_job(first, home, cfg(tiny_base), job_id=1))[0].outcome is Outcome.COMPLETED
    job_a = make_job(a, home, cfg(tiny_base), job_id=2)
    assert run(job_a, stop_at=3)[0].outcome is Outcome.STOPPED
    result, sink = run(job_a)
    assert result.outcome is Outcome.COMPLETED and not sink.of("restarted")
    assert sink.of("started")[0]["resumed_from_step"] == 3 and sink.of("step")[0]["step"] == 4
    assert lineage(home) == ["first.jsonl", "a.jsonl"]
