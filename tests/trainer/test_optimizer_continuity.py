"""One optimizer across files (issue 13, item 5): with a continuous schedule current_model/ carries
the AdamW state and the schedule position, so file B's first step continues file A's moments and
step count, with no second warmup. Asserted from the files (current_model/, B's checkpoint), not
from timing. The per-file cosine still restarts both; wsd decays only when asked; a stop and a
resume of B is exact; a damaged optimizer state is never used."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core.config import Config, ConfigError, config_to_dict, parse_config
from core.interface import Outcome
from daemon.generator import generate_records
from trainer.recipe import QLoRATrainer
from trainer.schedule import continuous_factor
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl, StopAfter

LR = 3e-3
BETA1, BETA2 = 0.9, 0.999          # torch AdamW's defaults (the recipe sets no others)


def cfg(base: Path, **kw: Any) -> dict[str, Any]:
    return config_to_dict(Config(**{**dict(
        base_model=str(base), max_length=64, batch_size=2, gradient_accumulation=1, lora_r=4,
        lora_alpha=8, lora_dropout=0.0, learning_rate=LR, lr_scheduler="constant_with_warmup",
        warmup_steps=3, weight_decay=0.01, eval_fraction=0.0, checkpoint_every_steps=1000,
        layer_activity_every_steps=1000, seed=0), **kw}))


def dataset(path: Path, n: int, seed: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_records(n, seed=seed)), encoding="utf-8")
    return path


def run(job: Any, stop_at: int | None = None) -> tuple[Any, ListSink]:
    sink = ListSink()
    result = QLoRATrainer().run(job, sink, StopAfter(sink, stop_at) if stop_at else NoControl())
    assert result.outcome is (Outcome.STOPPED if stop_at else Outcome.COMPLETED), result.reason
    return result, sink


def lrs(sink: ListSink) -> list[float]:
    return [e["learning_rate"] for e in sink.of("step")]


def schedule(home: Path) -> dict[str, Any]:
    return json.loads((home / "current_model/trainer_state.json").read_text())["schedule"]


def adam_state(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("continuity_data")
    return dataset(d / "a.jsonl", 16, seed=1), dataset(d / "b.jsonl", 16, seed=2)


@pytest.mark.slow
def test_adamw_and_the_schedule_continue_across_two_files_and_resume_exactly(
        tiny_base: Path, files: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = files
    home, twin = tmp_path / "home", tmp_path / "twin"
    done_a, sink_a = run(make_job(a, home, cfg(tiny_base), job_id=1))
    n_a = done_a.steps
    assert n_a > 3 and lrs(sink_a)[:4] == pytest.approx([0.0, LR / 3, 2 * LR / 3, LR])   # warmup once
    sched = schedule(home)
    manifest = json.loads((home / "current_model/manifest.json").read_text())["files"]
    assert sched["global_step"] == n_a and sched["warmup_done"] and sched["optimizer_state"] == "optimizer.pt"
    assert "optimizer.pt" in manifest                     # a half-written one would not verify
    assert sched["adapter_sha256"] == manifest["adapter_model.safetensors"]["sha256"]
    (snap,) = (home / "snapshots").iterdir()
    assert not (snap / "optimizer.pt").exists()           # a snapshot is the adapter alone
    after_a = adam_state(home / "current_model/optimizer.pt")
    assert after_a and all(int(s["step"]) == n_a for s in after_a.values())
    shutil.copytree(home, twin)                           # the same A, for the uninterrupted B

    # B stops after its first step: its checkpoint shows AdamW continued from A's state
    job_b = make_job(b, home, cfg(tiny_base), job_id=2)
    _, first = run(job_b, stop_at=1)
    started = first.of("started")[0]
    assert started["optimizer"] == "current_model" and started["schedule_step"] == n_a
    assert lrs(first) == [LR]                             # the post-warmup rate: no second warmup
    b1 = adam_state(home / "checkpoints/job-2/step-1/optimizer.pt")
    assert b1.keys() == after_a.keys()
    for i, s in b1.items():
        m_a, v_a = after_a[i]["exp_avg"], after_a[i]["exp_avg_sq"]
        assert int(s["step"]) == n_a + 1
        g = (s["exp_avg"] - BETA1 * m_a) / (1 - BETA1)    # the gradient, if m continued A's
        torch.testing.assert_close(s["exp_avg_sq"], BETA2 * v_a + (1 - BETA2) * g * g, rtol=1e-4, atol=1e-12)
        fresh = (1 - BETA2) * (s["exp_avg"] / (1 - BETA1)) ** 2     # what a restarted AdamW holds
        assert not torch.allclose(s["exp_avg_sq"], fresh, rtol=1e-2), i

    # B resumed from that checkpoint == B uninterrupted (from the same A)
    done_b, resumed = run(job_b)
    _, whole = run(make_job(b, twin, cfg(tiny_base), job_id=2))
    assert resumed.of("started")[0]["optimizer"] == "checkpoint"
    ref = {e["step"]: e["loss"] for e in whole.of("step")}
    assert {e["step"]: e["loss"] for e in resumed.of("step")} == {k: v for k, v in ref.items() if k > 1}
    assert lrs(whole) == [LR] * done_b.steps
    got, want = (load_file(str(h / "current_model/adapter_model.safetensors")) for h in (home, twin))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    got, want = adam_state(home / "current_model/optimizer.pt"), adam_state(twin / "current_model/optimizer.pt")
    assert all(torch.equal(got[i][k], want[i][k]) for i in want for k in want[i])
    assert all(int(s["step"]) == n_a + done_b.steps for s in got.values())
    assert schedule(home)["global_step"] == schedule(twin)["global_step"] == n_a + done_b.steps

    # a damaged optimizer state is never used: a fresh AdamW (and warmup again), said
    raw = bytearray((home / "current_model/optimizer.pt").read_bytes())
    raw[-9] ^= 0xFF
    (home / "current_model/optimizer.pt").write_bytes(bytes(raw))
    _, third = run(make_job(a, home, cfg(tiny_base), job_id=3), stop_at=1)
    (fresh_ev,) = third.of("fresh_optimizer")
    assert "does not verify" in fresh_ev["reason"] and third.of("started")[0]["optimizer"] == "fresh"
    assert lrs(third) == [0.0]
    assert all(int(s["step"]) == 1 for s in adam_state(home / "checkpoints/job-3/step-1/optimizer.pt").values())


@pytest.mark.slow
def test_cosine_restarts_adamw_and_the_schedule_per_file(tiny_base: Path, files: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    a, b = files
    home = tmp_path / "home"
    per_file = cfg(tiny_base, lr_scheduler="cosine", warmup_steps=2)
    _, sink_a = run(make_job(a, home, per_file, job_id=1))
    assert lrs(sink_a)[:3] == pytest.approx([0.0, LR / 2, LR])
    assert not (home / "current_model/optimizer.pt").exists() and schedule(home)["optimizer_state"] is None

    _, sink_b = run(make_job(b, home, per_file, job_id=2), stop_at=1)
    assert lrs(sink_b) == [0.0] and sink_b.of("started")[0]["optimizer"] == "fresh"   # warmup again
    assert not sink_b.of("fresh_optimizer")              # per file: nothing to announce
    assert all(int(s["step"]) == 1 for s in adam_state(home / "checkpoints/job-2/step-1/optimizer.pt").values())

    # switching to a continuous schedule: nothing to continue yet, and it says why
    _, sink_c = run(make_job(b, home, cfg(tiny_base), job_id=3), stop_at=1)
    (ev,) = sink_c.of("fresh_optimizer")
    assert "no optimizer state" in ev["reason"] and "cosine" in ev["reason"], ev


@pytest.mark.slow
def test_wsd_stays_stable_and_decays_only_when_asked(tiny_base: Path, files: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    a, b = files
    home = tmp_path / "home"
    done_a, sink_a = run(make_job(a, home, cfg(tiny_base, lr_scheduler="wsd", warmup_steps=0), job_id=1))
    assert lrs(sink_a) == [LR] * done_a.steps and not schedule(home)["decayed"]

    asked = cfg(tiny_base, lr_scheduler="wsd", warmup_steps=0, wsd_decay_fraction=0.5)
    done_b, sink_b = run(make_job(b, home, asked, job_id=2))
    n = done_b.steps
    assert sink_b.of("started")[0]["optimizer"] == "current_model"
    # one segment (a small file): the fraction done before step s is s / n
    want = [LR * (1.0 if s / n < 0.5 else 1.0 - (s / n - 0.5) / 0.5) for s in range(n)]
    assert lrs(sink_b) == pytest.approx(want) and lrs(sink_b)[-1] < LR / 2
    sched = schedule(home)
    assert sched["decayed"] and sched["global_step"] == done_a.steps + n


def test_the_continuous_factor_and_its_config() -> None:
    f = continuous_factor("constant_with_warmup", 4, 0, 0.0, lambda s: 0.0)
    assert [f(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    later = continuous_factor("constant_with_warmup", 4, 2, 0.0, lambda s: 0.0)   # the 2nd file
    assert [later(s) for s in range(3)] == [0.5, 0.75, 1.0]
    wsd = continuous_factor("wsd", 0, 100, 0.25, lambda s: s / 8)
    assert [wsd(s) for s in range(8)] == [1.0] * 6 + [1.0, 0.5]
    assert continuous_factor("wsd", 0, 100, 0.0, lambda s: s / 8)(7) == 1.0           # not asked

    assert Config().lr_scheduler == "constant_with_warmup" and Config().wsd_decay_fraction == 0.0
    with pytest.raises(ConfigError) as err:
        parse_config({"lr_scheduler": "cosine", "wsd_decay_fraction": 0.2, "warmup_steps": -1})
    msg = str(err.value)
    assert "2 problem(s)" in msg and "wsd_decay_fraction: only lr_scheduler wsd decays" in msg, msg
    assert "warmup_steps" in msg
