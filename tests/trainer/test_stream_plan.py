"""Training starts on the first window of a file while the rest is tokenized (trainer/plan.py),
and that changes nothing a user can see: exact resume across windows, and the step-based LR
schedule whenever the job is one segment."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.config import Config, config_to_dict
from trainer import plan as plan_mod
from trainer import tokenbuild
from daemon.generator import generate_records
from core.interface import Outcome
from trainer.recipe import QLoRATrainer
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl, StopAfter


def _cfg(base: Path) -> dict:
    return config_to_dict(Config(base_model=str(base), max_length=64, batch_size=2, gradient_accumulation=2,
                                 lora_r=4, lora_alpha=8, lora_dropout=0.1, learning_rate=3e-3,
                                 lr_scheduler="cosine", warmup_steps=2, epochs=2, eval_fraction=0.1,
                                 checkpoint_every_steps=3, seed=5))


@pytest.fixture()
def windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenbuild, "BLOCK", 4)      # the build publishes every 4 lines
    monkeypatch.setattr(plan_mod, "WINDOW", 16)      # epoch 0 in windows of 16 lines


def test_windows_resume_exactly(one_cpu_thread: None, windows: None, tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_records(60, seed=4)), encoding="utf-8")
    ref_sink = ListSink()
    ref = QLoRATrainer().run(make_job(data, tmp_path / "ref", _cfg(tiny_base), job_id=1), ref_sink, NoControl())
    assert ref.outcome is Outcome.COMPLETED, ref.reason
    started = ref_sink.of("started")[0]
    steps = ref_sink.of("step")
    assert started["data_cache"]["hit"] is False and started["data_cache"]["lines"] == 60
    # 54 training lines = 4 windows in epoch 0, then epoch 1 over all: the final count is exact
    assert steps[-1]["total_steps"] == ref.steps == len(steps)
    ref_w = load_file(str(tmp_path / "ref" / "current_model" / "adapter_model.safetensors"))

    home = tmp_path / "home"
    job = make_job(data, home, _cfg(tiny_base), job_id=1)
    first = ListSink()
    stop_at = 7                                      # inside epoch 0, past its first window
    assert QLoRATrainer().run(job, first, StopAfter(first, stop_at)).outcome is Outcome.STOPPED
    second = ListSink()
    result = QLoRATrainer().run(job, second, NoControl())
    assert result.outcome is Outcome.COMPLETED, result.reason
    assert second.of("started")[0]["resumed_from_step"] == stop_at
    assert second.of("started")[0]["data_cache"]["hit"] is True
    ref_losses = {e["step"]: e["loss"] for e in steps}
    assert {e["step"]: e["loss"] for e in second.of("step")} == {k: v for k, v in ref_losses.items() if k > stop_at}
    assert [e["learning_rate"] for e in second.of("step")] == [e["learning_rate"] for e in steps[stop_at:]]
    got = load_file(str(home / "current_model" / "adapter_model.safetensors"))
    assert got.keys() == ref_w.keys() and all(torch.equal(got[k], ref_w[k]) for k in got)
    # every training line was trained once per epoch, the held-out ones never
    report = second.of("started")[0]["dataset"]
    assert report["records"] == 60


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_one_segment_is_the_step_based_schedule(kind: str) -> None:
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    total, warmup = 37, 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = {"cosine": lambda: get_cosine_schedule_with_warmup(opt, warmup, total),
          "linear": lambda: get_linear_schedule_with_warmup(opt, warmup, total),
          "constant": lambda: get_constant_schedule_with_warmup(opt, warmup)}[kind]().lr_lambdas[0]
    ours = plan_mod.lr_factor(kind, warmup, lambda s: min(1.0, s / total))
    assert [ours(s) for s in range(total + 1)] == pytest.approx([hf(s) for s in range(total + 1)], abs=1e-12)
