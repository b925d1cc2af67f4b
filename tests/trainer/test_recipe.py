"""The in-process recipe on the tiny real base (real 4-bit bitsandbytes on CPU)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from core.config import Config, config_to_dict
from daemon.generator import generate_records
from core.interface import Command, Outcome
from trainer.recipe import QLoRATrainer
from trainer.train import make_job
from trainer_helpers import ListSink

REPO = Path(__file__).resolve().parents[2]


def tiny_config(base: Path, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(base_model=str(base), max_length=128, batch_size=2, gradient_accumulation=1,
                              lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3,
                              lr_scheduler="constant", epochs=1, checkpoint_every_steps=1000,
                              layer_activity_every_steps=5, seed=0)
    kw.update(over)
    return config_to_dict(Config(**kw))


class ScriptedControl:
    """Returns scripted commands after given step events (a real ControlSource, in process)."""

    def __init__(self, sink: ListSink, at: dict[int, list[Command]] | None = None) -> None:
        self.sink, self.at, self.pending = sink, dict(at or {}), []

    def poll(self) -> Command | None:
        steps = self.sink.of("step")
        if steps and steps[-1]["step"] in self.at:
            self.pending += self.at.pop(steps[-1]["step"])
        return self.pending.pop(0) if self.pending else None

    def wait(self, timeout: float) -> Command | None:
        return self.poll()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def records_in_format(fmt: str, n: int, seed: int = 0) -> list[dict]:
    out = []
    for r in generate_records(n, seed=seed):
        sys_, user, asst = (m["content"] for m in r["messages"])
        if fmt == "messages":
            out.append(r)
        elif fmt == "prompt_completion":
            out.append({"prompt": user, "completion": asst})
        elif fmt == "alpaca":
            out.append({"instruction": sys_, "input": user, "output": asst})
        elif fmt == "sharegpt":
            out.append({"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": asst}]})
        elif fmt == "text":
            out.append({"text": f"{user} {asst}"})
    return out


def run(job: Any, control_at: dict[int, list[Command]] | None = None) -> tuple[Any, ListSink]:
    sink = ListSink()
    return QLoRATrainer().run(job, sink, ScriptedControl(sink, control_at)), sink


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "alpaca", "sharegpt", "text"])
def test_each_format_trains_and_loss_falls(tiny_base: Path, tmp_path: Path, fmt: str) -> None:
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", records_in_format(fmt, 24))
    job = make_job(data, tmp_path / "home", tiny_config(tiny_base, epochs=4), job_id=1)
    result, sink = run(job)
    assert result.outcome is Outcome.COMPLETED, result.reason
    losses = [e["loss"] for e in sink.of("step")]
    assert len(losses) == result.steps == sink.of("started")[0]["total_steps"]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses
    step = sink.of("step")[-1]
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "step_time_s", "epoch", "tokens",
                "peak_memory_bytes", "eta_seconds"):
        assert step[key] is not None and step[key] >= 0, key
    assert step["peak_memory_bytes"] > 10_000_000  # process RSS on CPU
    # the adapter is published with its lineage, and a snapshot is made
    home = tmp_path / "home"
    cur = home / "current_model"
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json",
            "manifest.json"} <= {p.name for p in cur.iterdir()}
    state = json.loads((cur / "trainer_state.json").read_text())
    assert state["base_fingerprint"] and state["base_model"] == str(tiny_base.resolve())
    assert [d["sha256"] for d in state["datasets"]] == [job.sha256]
    snaps = list((home / "snapshots").iterdir())
    assert len(snaps) == 1 and snaps[0].name.endswith(f"__{fmt}")
    meta = json.loads((snaps[0] / "snapshot.json").read_text())
    assert meta["dataset_sha256"] == job.sha256 and meta["steps"] == result.steps
    assert meta["final_train_loss"] == pytest.approx(losses[-1])
    assert meta["base_fingerprint"] == state["base_fingerprint"] and meta["job_id"] == 1
    assert not (home / "checkpoints" / "job-1").exists()  # a completed job's checkpoints are gone


@pytest.mark.slow
def test_continues_current_model_with_eval_and_lineage(tiny_base: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cfg = tiny_config(tiny_base, epochs=2, eval_fraction=0.2, lora_dropout=0.1)
    a = make_job(write_jsonl(tmp_path / "a.jsonl", records_in_format("messages", 20, seed=1)), home, cfg, job_id=1)
    b = make_job(write_jsonl(tmp_path / "b.jsonl", records_in_format("messages", 20, seed=2)), home, cfg, job_id=2)
    ra, sa = run(a)
    assert ra.outcome is Outcome.COMPLETED and sa.of("started")[0]["continued_from"] == "fresh"
    evals = sa.of("eval")
    assert len(evals) == 2 and all(math.isfinite(e["eval_loss"]) for e in evals)  # one per epoch
    w_a = load_file(str(home / "current_model" / "adapter_model.safetensors"))
    rb, sb = run(b)
    assert rb.outcome is Outcome.COMPLETED and sb.of("started")[0]["continued_from"] == "current_model"
    w_b = load_file(str(home / "current_model" / "adapter_model.safetensors"))
    assert w_a.keys() == w_b.keys() and any((w_a[k] != w_b[k]).any() for k in w_a)
    state = json.loads((home / "current_model" / "trainer_state.json").read_text())
    assert [d["job_id"] for d in state["datasets"]] == [1, 2]
    assert state["total_steps"] == ra.steps + rb.steps
    assert len(list((home / "snapshots").iterdir())) == 2
    # the same job again (a crash after the swap, say) is recognised, not trained twice
    rb2, sb2 = run(b)
    assert rb2.outcome is Outcome.COMPLETED and rb2.details.get("already_completed") is True
    assert not sb2.of("step")
    assert len(json.loads((home / "current_model" / "trainer_state.json").read_text())["datasets"]) == 2


@pytest.mark.slow
def test_missing_base_is_a_clear_failure(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", records_in_format("messages", 4))
    missing = tmp_path / "no-such-base"
    result, _ = run(make_job(data, tmp_path / "home", tiny_config(missing), job_id=1))
    assert result.outcome is Outcome.FAILED and str(missing) in result.reason


def _other_base(tiny_base: Path, where: Path) -> Path:
    """The same weights under another fingerprint (config.json differs by a harmless key)."""
    other = shutil.copytree(tiny_base, where)
    cfg = json.loads((other / "config.json").read_text())
    cfg["_variant"] = "other"
    (other / "config.json").write_text(json.dumps(cfg))
    return other


@pytest.mark.slow
def test_base_mismatch_is_refused_for_adapter_and_checkpoint(tiny_base: Path, tmp_path: Path) -> None:
    other = _other_base(tiny_base, tmp_path / "other-base")
    home = tmp_path / "home"
    data = write_jsonl(tmp_path / "d.jsonl", records_in_format("messages", 12))
    first, _ = run(make_job(data, home, tiny_config(tiny_base), job_id=1))
    assert first.outcome is Outcome.COMPLETED
    before = (home / "current_model" / "adapter_model.safetensors").read_bytes()

    # continuing current_model/ on another base
    data2 = write_jsonl(tmp_path / "d2.jsonl", records_in_format("messages", 12, seed=5))
    result, sink = run(make_job(data2, home, tiny_config(other), job_id=2))
    assert result.outcome is Outcome.FAILED
    assert str(tiny_base.resolve()) in result.reason and str(other.resolve()) in result.reason
    assert "current_model" in result.reason and not sink.of("step")
    assert (home / "current_model" / "adapter_model.safetensors").read_bytes() == before

    # a checkpoint made on another base (fresh home: no current_model in the way) cannot be
    # continued: the job starts again on the configured base, and says so
    home2 = tmp_path / "home2"
    job = make_job(data2, home2, tiny_config(tiny_base), job_id=3)
    stopped, _ = run(job, {2: [Command.STOP]})
    assert stopped.outcome is Outcome.STOPPED and stopped.steps == 2
    assert (home2 / "checkpoints" / "job-3" / "step-2").is_dir()
    result, sink = run(make_job(data2, home2, tiny_config(other), job_id=3))
    assert result.outcome is Outcome.COMPLETED, result.reason
    (restarted,) = sink.of("restarted")
    assert "another base" in restarted["reason"]
    assert str(tiny_base.resolve()) in restarted["reason"] and str(other.resolve()) in restarted["reason"]
    assert sink.of("started")[0]["resumed_from_step"] == 0 and sink.of("step")[0]["step"] == 1
    state = json.loads((home2 / "current_model" / "trainer_state.json").read_text())
    assert state["base_fingerprint"] == result.details["base_fingerprint"]


@pytest.mark.slow
def test_full_precision_path_trains(tiny_base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", records_in_format("messages", 12))
    result, sink = run(make_job(data, tmp_path / "home", tiny_config(tiny_base, use_qlora=False,
                                                                     gradient_checkpointing=True), job_id=1))
    assert result.outcome is Outcome.COMPLETED and sink.of("step")


@pytest.mark.slow
def test_train_cli_trains_one_file(tiny_base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "cli.jsonl", records_in_format("prompt_completion", 16))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"max_length": 128, "batch_size": 2, "lora_r": 4, "learning_rate": 5e-3}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--dataset", str(data), "--output-dir",
                           str(out), "--epochs", "2", "--config", str(cfg), "--base", str(tiny_base)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1/" in proc.stdout and "result: completed" in proc.stdout
    assert (out / "current_model" / "adapter_model.safetensors").is_file()
    assert len(list((out / "snapshots").iterdir())) == 1
