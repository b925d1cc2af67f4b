"""Replay: each file keeps a pool of its training examples, and a later job with replay_fraction > 0
mixes examples of the earlier files into what it trains, so it forgets less. The draw is a pure
function of (pools, file, config): exact resume holds with replay and retention eval on."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from core.config import Config, config_to_dict
from core.interface import Outcome
from core.paths import Layout
from core.statedb import StateDB
from daemon.generator import generate_records
from daemon.subprocess_trainer import SubprocessTrainer
from daemon_helpers import Home, reverse_records, write_jsonl
from test_retention_eval import CFG
from trainer.data import IGNORE_INDEX, Example
from trainer.recipe import QLoRATrainer
from trainer.replay import REPLAY_BASE, MixedExamples, ReplaySet, load_pool, pool_path, save_pool
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl, start_worker_and_kill


def ex(i: int, n: int = 5) -> Example:
    ids = [i * 10 + k for k in range(n)]
    return Example(input_ids=ids, labels=[IGNORE_INDEX] * 2 + ids[2:], line=i + 1)


def test_a_pool_round_trips_and_the_draw_is_seeded(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    examples = [ex(i, n=3 + i % 4) for i in range(50)]
    path = save_pool(layout, {"job_id": 3, "name": "a.jsonl", "tokenizer": "t1"}, examples, limit=20, seed=0)
    assert path == pool_path(layout, 3) and path.is_file()
    meta, pool = load_pool(path)
    assert meta["name"] == "a.jsonl" and len(pool) == 20
    assert all(p in examples for p in pool)            # a sample of the training examples, tokens as they were
    assert save_pool(layout, {"job_id": 4, "name": "b.jsonl", "tokenizer": "t2"}, examples[:5], limit=20, seed=0)
    assert save_pool(layout, {"job_id": 5, "name": "empty.jsonl", "tokenizer": "t1"}, [], limit=20, seed=0) is None

    rs, notes = ReplaySet.load(layout, [3, 4, 9], tokenizer="t1", max_length=5, fraction=0.2, seed=0, sha256="ab" * 32)
    assert rs is not None and len(notes) == 2        # job 4: another tokenizer; job 9: no pool
    assert any("another tokenizer" in n for n in notes) and any("job 9" in n for n in notes)
    assert all(len(e) <= 5 for e in rs.examples)     # longer than max_length: left out
    again, _ = ReplaySet.load(layout, [3], tokenizer="t1", max_length=5, fraction=0.2, seed=0, sha256="ab" * 32)
    other, _ = ReplaySet.load(layout, [3], tokenizer="t1", max_length=5, fraction=0.2, seed=0, sha256="cd" * 32)
    assert [rs.example(p) for p in range(40)] == [again.example(p) for p in range(40)]
    assert [rs.example(p) for p in range(40)] != [other.example(p) for p in range(40)]
    assert rs.count_for(80) == 20                    # 20 of 100 trained examples are replay
    assert rs.summary(7)["examples"] == 7 and rs.summary(7)["datasets"] == {"a.jsonl": 7}
    mixed = MixedExamples(examples, rs)
    assert mixed[4] == examples[4] and mixed[REPLAY_BASE + 2] == rs.example(2)
    assert ReplaySet.load(layout, [9], tokenizer="t1", max_length=5, fraction=0.2, seed=0, sha256=None)[0] is None


def a_change_after_b(home: Home, base: Path, replay: float) -> tuple[float, dict[str, Any]]:
    """Train B (reverse the word) on top of A; A's retention loss change and B's data report."""
    home.write_config(base_model=str(base), **{**CFG, "epochs": 2, "replay_fraction": replay})
    write_jsonl(home.path / "inbox/reverse.jsonl", reverse_records(300, seed=8))
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((home.path / "status/eval.json").read_text())
    add = next(d for d in m["datasets"] if d["name"] == "add.jsonl")
    db = StateDB(home.path / "status/state.db")
    try:
        report = db.get(2).report()
    finally:
        db.close()
    return add["cells"][-1]["change"], report


@pytest.mark.slow
def test_replay_makes_the_model_forget_less(home: Home, tiny_base: Path, tmp_path: Path, capsys) -> None:
    home.write_config(base_model=str(tiny_base), **CFG)
    write_jsonl(home.path / "inbox/add.jsonl", generate_records(300, seed=7))
    assert home.burst(timeout=300).returncode == 0
    assert pool_path(Layout(home.path), 1).is_file()
    other = Home(tmp_path / "home-replay")
    shutil.copytree(home.path, other.path)           # the same A, twice

    without, rep0 = a_change_after_b(home, tiny_base, 0.0)
    with_replay, rep = a_change_after_b(other, tiny_base, 0.3)
    with capsys.disabled():
        print(f"\nA's retention loss change after B: replay 0 {without:+.4f}, replay 0.3 {with_replay:+.4f}")
    assert "replay" not in rep0
    assert rep["replay"]["fraction"] == 0.3 and rep["replay"]["datasets"] == {"add.jsonl": rep["replay"]["examples"]}
    # 30 % of what B trained is replay: 3 replay examples for every 7 of the file's training examples
    # (its 300 less the 12 of its retention set)
    assert rep["replay"]["examples"] == pytest.approx((rep["examples"] - 12) * 3 / 7, abs=1)
    assert without > 0 and with_replay < without / 2
    shown = other.ctl("queue", "show", "reverse.jsonl")
    assert "replay:" in shown.stdout and "add.jsonl" in shown.stdout, shown.stdout


def replay_config(base: Path, **kw: Any) -> dict[str, Any]:
    return config_to_dict(Config(
        base_model=str(base), max_length=64, batch_size=2, gradient_accumulation=2, lora_r=4, lora_alpha=8,
        lora_dropout=0.1, learning_rate=3e-3, warmup_steps=2, epochs=2,
        eval_fraction=0.1, checkpoint_every_steps=2, keep_checkpoints=3, layer_activity_every_steps=3, seed=7,
        **kw))


@pytest.mark.slow
def test_exact_resume_with_replay_and_retention_eval(one_cpu_thread: None, tiny_base: Path, tmp_path: Path) -> None:
    first = tmp_path / "a.jsonl"
    write_jsonl(first, generate_records(40, seed=3))
    second = tmp_path / "b.jsonl"
    write_jsonl(second, reverse_records(40, seed=4))
    cfg = replay_config(tiny_base, replay_fraction=0.25)
    ref_home = tmp_path / "ref"
    r = QLoRATrainer().run(make_job(first, ref_home, cfg, job_id=1), ListSink(), NoControl())
    assert r.outcome is Outcome.COMPLETED, r.reason
    kill_home = tmp_path / "kill"
    shutil.copytree(ref_home, kill_home)

    sink = ListSink()                               # the uninterrupted run of B
    r = QLoRATrainer().run(make_job(second, ref_home, cfg, job_id=2), sink, NoControl())
    assert r.outcome is Outcome.COMPLETED, r.reason
    assert sink.of("started")[0]["optimizer"] == "current_model"     # A's AdamW state, continued
    assert r.details["data"]["replay"]["examples"] > 0
    ref_losses = {e["step"]: e["loss"] for e in sink.of("step")}
    ref_retention = sink.of("retention")[0]["rows"]

    job = make_job(second, kill_home, cfg, job_id=2)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job.to_json()))
    before = start_worker_and_kill(job_file, 4)
    for step, loss in before.items():
        assert loss == pytest.approx(ref_losses[step], abs=1e-6)
    sink = ListSink()
    r = SubprocessTrainer(extra_env={"OMP_NUM_THREADS": "1"}).run(job, sink, NoControl())
    assert r.outcome is Outcome.COMPLETED, r.reason
    started = sink.of("started")[0]
    assert started["resumed_from_step"] >= 2
    # one optimizer across the two files (the default continuous schedule): B went on from A's AdamW
    assert cfg["lr_scheduler"] == "constant_with_warmup" and started["optimizer"] == "checkpoint"
    assert started["schedule_step"] > started["resumed_from_step"]
    for e in sink.of("step"):
        assert e["loss"] == pytest.approx(ref_losses[e["step"]], abs=1e-6), e["step"]
    rows = sink.of("retention")[0]["rows"]
    assert [x["dataset_job"] for x in rows] == [1, 2]
    for got, want in zip(rows, ref_retention):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    a = load_file(str(ref_home / "current_model/adapter_model.safetensors"))
    b = load_file(str(kill_home / "current_model/adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
