"""Exact resume: a real worker subprocess killed with SIGKILL after step k, then resumed, gives
the same per-step losses after k and the same final adapter as an uninterrupted run."""
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
from daemon.subprocess_trainer import SubprocessTrainer
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl, start_worker_and_kill

KILL_AFTER = 5


def resume_config(base: Path) -> dict[str, Any]:
    # dropout + gradient checkpointing + warmup/cosine + 2 epochs + eval + accumulation + probe
    # generation every 2 steps: every piece of state that a resume could get wrong is in play.
    return config_to_dict(Config(
        base_model=str(base), max_length=64, batch_size=2, gradient_accumulation=2, lora_r=4,
        lora_alpha=8, lora_dropout=0.1, gradient_checkpointing=True, learning_rate=3e-3,
        lr_scheduler="cosine", warmup_steps=2, weight_decay=0.01, epochs=2, eval_fraction=0.1,
        checkpoint_every_steps=2, keep_checkpoints=3, layer_activity_every_steps=3, seed=7,
        probe_prompts=["What is 2 + 3?"], probe_every_steps=2, probe_max_new_tokens=8))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("resume_data") / "resume.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in generate_records(48, seed=3)), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def reference(one_cpu_thread: None, tiny_base: Path, dataset: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run."""
    home = tmp_path_factory.mktemp("resume_ref")
    sink = ListSink()
    result = QLoRATrainer().run(make_job(dataset, home, resume_config(tiny_base), job_id=1), sink, NoControl())
    assert result.outcome is Outcome.COMPLETED, result.reason
    losses = {e["step"]: e["loss"] for e in sink.of("step")}
    assert len(losses) == result.steps >= KILL_AFTER + 4
    return {"losses": losses, "evals": [e["eval_loss"] for e in sink.of("eval")],
            "weights": load_file(str(home / "current_model" / "adapter_model.safetensors")),
            "steps": result.steps}


@pytest.mark.slow
@pytest.mark.parametrize("corrupt_newest", [False, True], ids=["newest", "corrupt-newest-falls-back"])
def test_sigkill_then_resume_is_exact(tiny_base: Path, dataset: Path, reference: dict[str, Any],
                                      tmp_path: Path, corrupt_newest: bool) -> None:
    home = tmp_path / "home"
    job = make_job(dataset, home, resume_config(tiny_base), job_id=1)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job.to_json()))

    before = start_worker_and_kill(job_file, KILL_AFTER)
    for step, loss in before.items():  # the same run up to the kill
        assert loss == pytest.approx(reference["losses"][step], abs=1e-6)
    ckpt_root = home / "checkpoints" / "job-1"
    saved = sorted(int(p.name.split("-")[1]) for p in ckpt_root.glob("step-*"))
    assert saved and saved[-1] >= 2 and not (home / "current_model").exists()
    expect_from = saved[-1]
    if corrupt_newest:
        assert len(saved) >= 2
        weights = ckpt_root / f"step-{saved[-1]}" / "adapter_model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-5] ^= 0xFF                      # one flipped byte: the manifest no longer matches
        weights.write_bytes(bytes(raw))
        expect_from = saved[-2]

    sink = ListSink()
    result = SubprocessTrainer(extra_env={"OMP_NUM_THREADS": "1"}).run(job, sink, NoControl())
    assert result.outcome is Outcome.COMPLETED, result.reason
    started = sink.of("started")[0]
    assert started["resumed_from_step"] == expect_from and started["continued_from"] == "checkpoint"
    if corrupt_newest:
        warnings = [e["message"] for e in sink.of("log") if e["level"] == "warning"]
        assert any("unusable checkpoint" in m and f"step-{saved[-1]}" in m for m in warnings), warnings

    resumed = {e["step"]: e["loss"] for e in sink.of("step")}
    assert sorted(resumed) == list(range(expect_from + 1, reference["steps"] + 1))
    for step, loss in resumed.items():
        assert abs(loss - reference["losses"][step]) <= 1e-6, (step, loss, reference["losses"][step])
    assert sink.of("eval")[-1]["eval_loss"] == pytest.approx(reference["evals"][-1], abs=1e-6)

    final = load_file(str(home / "current_model" / "adapter_model.safetensors"))
    assert final.keys() == reference["weights"].keys()
    worst = max(float((final[k] - reference["weights"][k]).abs().max()) for k in final)
    assert worst <= 1e-6, worst
    assert not ckpt_root.exists()  # completed: the job's checkpoints are cleaned up
