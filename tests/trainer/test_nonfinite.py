"""A non-finite step never reaches current_model/ (issue 9, item 3).

Faults are injected by wrapping ``_RecipeRun._loss_sum`` (the loss of one micro-batch becomes
inf at chosen steps): the recipe under test is the real one, on the tiny real base.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import Config, config_to_dict
from trainer import adapter_store
from daemon.generator import generate_records
from core.interface import Outcome
from trainer.recipe import QLoRATrainer, _RecipeRun
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl, StopAfter

DIVERGING_LR = 1e30   # float32 on CPU: loss NaN from step 2 for any lr >= ~1e20 (1e18 stays finite)


def cfg(base: Path, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(base_model=str(base), max_length=64, batch_size=2, gradient_accumulation=1,
                              lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3,
                              lr_scheduler="constant", epochs=1, checkpoint_every_steps=1000,
                              layer_activity_every_steps=2, seed=0, max_nonfinite_steps=3)
    kw.update(over)
    return config_to_dict(Config(**kw))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("nonfinite") / "arith.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in generate_records(24, seed=0)), encoding="utf-8")
    return p


@pytest.fixture
def inf_loss_at(monkeypatch: pytest.MonkeyPatch):
    """inf_loss_at(steps): the first micro-batch of each of those optimizer steps has loss inf
    (``"all"``: every step). The gradients become inf/NaN too (the loss is scaled by inf)."""
    orig = _RecipeRun._loss_sum

    def install(steps: set[int] | str) -> None:
        def faulty(self: _RecipeRun, batch: Any) -> torch.Tensor:
            out = orig(self, batch)
            n = self.step + 1     # the step being computed
            if (steps == "all" or n in steps) and getattr(self, "_faulted", None) != n:
                self._faulted = n
                out = out * float("inf")
            return out
        monkeypatch.setattr(_RecipeRun, "_loss_sum", faulty)
    return install


def run(job: Any, control: Any = None) -> tuple[Any, ListSink]:
    sink = ListSink()
    return QLoRATrainer().run(job, sink, control or NoControl()), sink


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def tree(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


# ------------------------------------------------------------------ one bad micro-batch: skipped

def test_one_inf_step_is_skipped_counted_and_resume_stays_exact(tiny_base: Path, data: Path,
                                                               tmp_path: Path, inf_loss_at) -> None:
    inf_loss_at({3})
    # uninterrupted
    ref_home = tmp_path / "ref"
    ref, ref_sink = run(make_job(data, ref_home, cfg(tiny_base), job_id=1))
    assert ref.outcome is Outcome.COMPLETED, ref.reason
    assert ref.details["nonfinite_steps"] == 1
    (ev,) = ref_sink.of("nonfinite")
    assert ev == {"event": "nonfinite", "step": 3, "loss": None, "grad_norm": None,
                  "consecutive": 1, "total": 1}
    steps = ref_sink.of("step")
    assert len(steps) == ref.steps > 5
    assert steps[2]["step"] == 3 and steps[2]["loss"] is None and steps[2]["grad_norm"] is None
    assert all(math.isfinite(s["loss"]) for s in steps if s["step"] != 3)
    assert any(e["level"] == "warning" and "step 3: non-finite" in e["message"] for e in ref_sink.of("log"))
    ref_weights = load_file(str(ref_home / "current_model" / "adapter_model.safetensors"))
    assert all_finite(ref_weights)
    state = json.loads((ref_home / "current_model" / "trainer_state.json").read_text())
    assert state["datasets"][-1]["final_loss"] == pytest.approx(steps[-1]["loss"])

    # stopped after step 4: the checkpoint's AdamW state is clean and counts 3 updates, the
    # schedule 4 steps; resumed, the run ends bitwise where the uninterrupted one did
    home = tmp_path / "home"
    job = make_job(data, home, cfg(tiny_base), job_id=1)
    sink = ListSink()
    first = QLoRATrainer().run(job, sink, StopAfter(sink, 4))
    assert first.outcome is Outcome.STOPPED and first.steps == 4
    ck = home / "checkpoints" / "job-1" / "step-4"
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    assert opt["state"] and all(all_finite({k: v for k, v in s.items() if k != "step"})
                                for s in opt["state"].values())
    assert {float(s["step"]) for s in opt["state"].values()} == {3.0}
    assert torch.load(ck / "scheduler.pt", weights_only=True)["last_epoch"] == 4
    assert json.loads((ck / "state.json").read_text())["nonfinite_steps"] == 1
    second, sink2 = run(job)
    assert second.outcome is Outcome.COMPLETED and second.steps == ref.steps
    assert second.details["nonfinite_steps"] == 1 and not sink2.of("nonfinite")
    weights = load_file(str(home / "current_model" / "adapter_model.safetensors"))
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


# ------------------------------------------------------------------ every step bad: FAILED

def test_nonfinite_every_step_fails_after_the_limit_and_publishes_nothing(
        tiny_base: Path, data: Path, tmp_path: Path, inf_loss_at) -> None:
    home = tmp_path / "home"
    good, _ = run(make_job(data, home, cfg(tiny_base), job_id=1))
    assert good.outcome is Outcome.COMPLETED
    before_cur, before_snaps = tree(home / "current_model"), sorted((home / "snapshots").iterdir())

    inf_loss_at("all")
    other = data.with_name("other.jsonl")
    other.write_text("".join(json.dumps(r) + "\n" for r in generate_records(24, seed=5)), encoding="utf-8")
    result, sink = run(make_job(other, home, cfg(tiny_base, checkpoint_every_steps=2), job_id=2))
    assert result.outcome is Outcome.FAILED and result.steps == 3
    assert result.reason.startswith("3 non-finite steps in a row (steps 1-3, last loss inf")
    assert "lower learning_rate" in result.reason and "nothing was published" in result.reason
    assert [(e["step"], e["consecutive"], e["total"]) for e in sink.of("nonfinite")] == [(1, 1, 1), (2, 2, 2),
                                                                                        (3, 3, 3)]
    assert [s["loss"] for s in sink.of("step")] == [None, None, None]
    assert tree(home / "current_model") == before_cur
    assert sorted((home / "snapshots").iterdir()) == before_snaps
    assert not (home / "checkpoints" / "job-2").exists()   # a retry starts afresh, with the new config
    assert sorted(p.name for p in home.iterdir() if p.name.startswith("current_model")) == ["current_model"]


def test_diverging_learning_rate_fails_clearly(tiny_base: Path, data: Path, tmp_path: Path) -> None:
    """Through the product's surface: a learning rate that blows the adapter up."""
    home = tmp_path / "home"
    result, sink = run(make_job(data, home, cfg(tiny_base, learning_rate=DIVERGING_LR), job_id=1))
    assert result.outcome is Outcome.FAILED, result.reason
    assert "3 non-finite steps in a row" in result.reason
    assert f"lower learning_rate (now {DIVERGING_LR:g})" in result.reason
    assert len(sink.of("nonfinite")) == 3 and result.steps <= 5
    assert not (home / "current_model").exists() and not (home / "snapshots").exists()
    assert not (home / "checkpoints" / "job-1").exists()


def test_a_nonfinite_adapter_is_refused_at_finish(tiny_base: Path, data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights gone inf by an update whose loss and gradients were finite: refused in memory."""
    orig_finish = _RecipeRun.finish

    def poisoned_finish(self: _RecipeRun) -> Any:
        with torch.no_grad():
            next(p for p in self.model.parameters() if p.requires_grad).view(-1)[:2] = float("inf")
        return orig_finish(self)

    monkeypatch.setattr(_RecipeRun, "finish", poisoned_finish)
    home = tmp_path / "home"
    result, sink = run(make_job(data, home, cfg(tiny_base), job_id=1))
    assert result.outcome is Outcome.FAILED
    assert result.reason.startswith("the trained adapter holds 2 non-finite values (NaN/inf) in 1 tensors: ")
    assert "nothing was published" in result.reason
    assert not (home / "current_model").exists() and not (home / "snapshots").exists()
    assert not sink.of("snapshot") and not (home / "checkpoints" / "job-1").exists()


# ------------------------------------------------------------------ adapter_store: the last guard

def nan_writer(value: float):
    def write(d: Path) -> None:
        (d / "adapter_config.json").write_text(json.dumps({"value": str(value)}))
        w = torch.ones(4, 4)
        w[1, 2] = value
        save_file({"lora_A.weight": torch.ones(2, 2), "lora_B.weight": w}, str(d / "adapter_model.safetensors"))
    return write


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_publish_and_snapshot_refuse_nonfinite_weights(tmp_path: Path, bad: float) -> None:
    cur = adapter_store.publish_current(tmp_path, nan_writer(1.0), {"datasets": [1]})
    snap = adapter_store.write_snapshot(tmp_path, "a.jsonl", cur, {"job_id": 1})
    before = tree(cur)
    with pytest.raises(adapter_store.NonFiniteAdapter, match=r"1 non-finite values .* lora_B\.weight \(1\)"):
        adapter_store.publish_current(tmp_path, nan_writer(bad), {"datasets": [1, 2]})
    assert tree(cur) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current_model", "snapshots"]
    assert adapter_store.recover_current_model(tmp_path) == "none"

    # a snapshot of a poisoned adapter folder (e.g. one written before this guard existed)
    poisoned = tmp_path / "poisoned"
    shutil.copytree(cur, poisoned)
    nan_writer(bad)(poisoned)
    with pytest.raises(adapter_store.NonFiniteAdapter, match="lora_B.weight"):
        adapter_store.write_snapshot(tmp_path, "b.jsonl", poisoned, {"job_id": 2})
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == [snap.name]   # no temp dir left


def test_first_publish_refused_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(adapter_store.NonFiniteAdapter):
        adapter_store.publish_current(tmp_path, nan_writer(float("nan")), {})
    assert list(tmp_path.iterdir()) == []
    assert adapter_store.read_current(tmp_path) == (None, {})


# ------------------------------------------------------------------ through the real daemon

@pytest.mark.slow
def test_daemon_fails_a_diverging_job_and_publishes_nothing(home: Any, tiny_base: Path, data: Path) -> None:
    home.write_config(trainer="qlora", base_model=str(tiny_base), max_length=64, batch_size=2,
                      gradient_accumulation=1, lora_r=4, lora_alpha=8, learning_rate=DIVERGING_LR,
                      lr_scheduler="constant", max_nonfinite_steps=3, worker_timeout_s=120)
    shutil.copy(data, home.path / "inbox" / "diverge.jsonl")
    r = home.burst(timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert home.files("failed") == ["diverge.jsonl"] and not home.files("done")
    reason = home.error("diverge.jsonl")["reason"]
    assert "3 non-finite steps in a row" in reason and "lower learning_rate" in reason, reason
    assert not (home.path / "current_model").exists()
    assert not (home.path / "snapshots").exists() or not list((home.path / "snapshots").iterdir())
