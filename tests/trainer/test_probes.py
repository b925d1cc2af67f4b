"""Probe prompts: the model's greedy answers to a configured prompt and to a few examples of each
retention set, at the base (the adapter disabled), every probe_every_steps and at the end of
every job; kept in state.db and in the snapshot; generating them leaves training untouched."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from core import probetable
from core.config import Config, config_to_dict
from core.interface import Outcome
from core.statedb import StateDB
from daemon.generator import generate_records
from daemon_helpers import reverse_records, write_jsonl
from trainer.data import IGNORE_INDEX
from trainer.probes import PromptText, chat_ids, config_probes, parse_prompt, split_example
from trainer.recipe import QLoRATrainer
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl

PROMPT = "What is 2 + 3?"
CFG = dict(trainer="qlora", max_length=96, batch_size=4, gradient_accumulation=1, learning_rate=5e-3,
           lr_scheduler="constant", checkpoint_every_steps=50, layer_activity_every_steps=50,
           worker_timeout_s=120, eval_fraction=0.1, eval_max_examples=8, retention_eval_datasets=20,
           probe_prompts=[PROMPT], probe_every_steps=4, probe_max_new_tokens=12)


def test_a_retention_example_splits_into_prompt_and_reference() -> None:
    x = IGNORE_INDEX
    assert split_example([5, 6, 7, 8, 9, 2, 4], [x, x, x, 8, 9, 2, x]) == ([5, 6, 7], [8, 9, 2])
    assert split_example([5, 6], [x, x]) is None                 # nothing labelled
    assert split_example([5, 6], [5, 6]) is None                 # no prompt


def test_probe_prompts_entries_and_the_prompt_text(tiny_tokenizer, tmp_path: Path) -> None:
    assert parse_prompt("hi") == ([{"role": "user", "content": "hi"}], None)
    assert parse_prompt({"prompt": "p", "reference": "r"}) == ([{"role": "user", "content": "p"}], "r")
    msgs, ref = parse_prompt({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                           {"role": "assistant", "content": "a"}]})
    assert [m["role"] for m in msgs] == ["system", "user"] and ref == "a"
    assert parse_prompt({"text": "plain"}) is None and parse_prompt("  ") is None and parse_prompt(3) is None
    # a rendered prompt is shown as the turns it was made from
    text = PromptText(tiny_tokenizer)
    assert text(chat_ids(tiny_tokenizer, [{"role": "user", "content": PROMPT}])) == PROMPT
    two = chat_ids(tiny_tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}])
    assert text(two) == f"system: Be brief.\nuser: {PROMPT}"
    # a JSONL file under the base dir; a missing one is a warning, never an error
    lines = [json.dumps("one"), "", json.dumps({"prompt": "two", "reference": "2"}), "not json"]
    (tmp_path / "probes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    probes, warning = config_probes("probes.jsonl", tmp_path, tiny_tokenizer)
    assert [(p.prompt, p.reference, p.source) for p in probes] == [("one", None, "config"), ("two", "2", "config")]
    assert "line 4 is not JSON" in warning
    probes, warning = config_probes("missing.jsonl", tmp_path, tiny_tokenizer)
    assert probes == [] and "missing.jsonl: cannot be read" in warning


def _answers(db_path: Path) -> list[dict[str, Any]]:
    db = StateDB(db_path)
    try:
        return probetable.read_rows(db)
    finally:
        db.close()


@pytest.mark.slow
def test_probes_at_the_base_during_and_after_two_jobs(home, tiny_base: Path, capsys) -> None:
    home.write_config(base_model=str(tiny_base), **CFG)
    write_jsonl(home.path / "inbox/add.jsonl", generate_records(120, seed=7))
    t0 = time.monotonic()
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    first_s = time.monotonic() - t0
    write_jsonl(home.path / "inbox/reverse.jsonl", reverse_records(120, seed=8))
    r = home.burst(timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert home.files("done") == ["add.jsonl", "reverse.jsonl"]

    rows = _answers(home.path / "status/state.db")
    db = StateDB(home.path / "status/state.db")
    try:
        jobs = {j.name: j for j in db.jobs()}
        events = [e for e in db.events(limit=1000) if e["kind"] == "probe"]
    finally:
        db.close()
    steps = {name: jobs[name].steps for name in jobs}
    assert all(isinstance(s, int) and s > 4 for s in steps.values()), steps

    # the configured prompt: the base once (this base), every 4 steps but the last, the end of each job
    mine = [r for r in rows if r["source"] == "config"]
    assert {r["prompt"] for r in mine} == {PROMPT} and all(r["reference"] is None for r in mine)
    got = [(r["job_id"], r["phase"], r["step"]) for r in mine]
    want = [(1, "base", 0)]
    for job_id, name in ((1, "add.jsonl"), (2, "reverse.jsonl")):
        want += [(job_id, "step", s) for s in range(4, steps[name], 4)] + [(job_id, "end", steps[name])]
    assert got == want
    assert all(isinstance(r["answer"], str) and r["seconds"] >= 0 for r in mine)
    assert {r["dataset"] for r in mine} == {"add.jsonl", "reverse.jsonl"}
    assert {r["base_fingerprint"] for r in mine if r["phase"] == "base"} != {""}

    # two examples of each retention set, with their reference answers: the base's answer (once,
    # when the set first exists: at the end of its job), then the adapter's at its end and in every
    # round of the jobs after it
    steps_2 = [(2, "step")] * len(range(4, steps["reverse.jsonl"], 4))
    for source, first_job in (("add.jsonl", 1), ("reverse.jsonl", 2)):
        theirs = [r for r in rows if r["source"] == source]
        prompts = sorted({r["prompt"] for r in theirs})
        assert len(prompts) == 2, prompts
        for p in prompts:
            seq = [(r["job_id"], r["phase"]) for r in theirs if r["prompt"] == p]
            later = steps_2 + [(2, "end")] if first_job == 1 else []
            assert seq == [(first_job, "base"), (first_job, "end")] + later, seq
            refs = {r["reference"] for r in theirs if r["prompt"] == p}
            assert len(refs) == 1 and next(iter(refs)).strip(), refs
        if source == "add.jsonl":
            assert all(p.startswith("system: You are a calculator") and "\nuser: " in p for p in prompts), prompts
            assert all(ref.strip().lstrip("-").isdigit() for r in theirs for ref in [r["reference"]])
        else:
            assert all(p.startswith("reverse the word ") for p in prompts), prompts

    # the snapshot holds its job's end answers
    for snap in sorted((home.path / "snapshots").iterdir()):
        meta = json.loads((snap / "snapshot.json").read_text())
        probes = meta["probes"]
        assert probes["phase"] == "end" and probes["job_id"] == meta["job_id"] and probes["step"] == meta["steps"]
        assert [p["prompt"] for p in probes["probes"]][0] == PROMPT
        assert len(probes["probes"]) == (3 if meta["job_id"] == 1 else 5)
    assert events and all(e["job_id"] in (1, 2) for e in events)

    seconds = [r["seconds"] for r in rows if r["phase"] == "end"]
    with capsys.disabled():
        print(f"\nprobe rounds on the tiny base (CPU): end of job {max(seconds):.3f} s at most for up to 5 prompts "
              f"x {CFG['probe_max_new_tokens']} tokens; first job {first_s:.1f} s in all")


def _run(tiny_base: Path, home: Path, data: Path,
         **probe: Any) -> tuple[dict[int, float], dict[str, torch.Tensor], ListSink]:
    base = dict(base_model=str(tiny_base), max_length=64, batch_size=2, gradient_accumulation=2, lora_r=4,
                lora_alpha=8, lora_dropout=0.1, learning_rate=3e-3, warmup_steps=2, epochs=2, eval_fraction=0.1,
                checkpoint_every_steps=50, seed=7)
    cfg = config_to_dict(Config(**{**base, **probe}))
    sink = ListSink()
    r = QLoRATrainer().run(make_job(data, home, cfg, job_id=1), sink, NoControl())
    assert r.outcome is Outcome.COMPLETED, r.reason
    return ({e["step"]: e["loss"] for e in sink.of("step")},
            load_file(str(home / "current_model" / "adapter_model.safetensors")), sink)


@pytest.mark.slow
def test_probes_leave_training_untouched(one_cpu_thread: None, tiny_base: Path, tmp_path: Path) -> None:
    """Dropout on, two epochs: the same losses and the same adapter with probes every 2 steps as
    without any (their RNG state restored, the train mode back, the 4-bit weights left trainable)."""
    data = tmp_path / "a.jsonl"
    write_jsonl(data, generate_records(40, seed=3))
    off_losses, off_weights, off = _run(tiny_base, tmp_path / "off", data, probe_retention_examples=0)
    assert off.of("probe") == []
    on_losses, on_weights, on = _run(tiny_base, tmp_path / "on", data, probe_prompts=[PROMPT, "hello"],
                                     probe_every_steps=2)
    phases = [e["phase"] for e in on.of("probe")]
    assert phases[0] == "base" and phases[-1] == "end" and phases.count("step") >= 3, phases
    assert on_losses == off_losses
    assert on_weights.keys() == off_weights.keys()
    assert all(torch.equal(on_weights[k], off_weights[k]) for k in on_weights)
    ev = on.of("probe")[0]
    assert set(ev) == {"event", "step", "job_id", "phase", "seconds", "probes"}
    assert set(ev["probes"][0]) == {"prompt", "answer", "reference", "source"}


@pytest.mark.slow
def test_a_time_budget_skips_the_prompts_left(one_cpu_thread: None, tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "a.jsonl"
    write_jsonl(data, generate_records(24, seed=3))
    _, _, sink = _run(tiny_base, tmp_path / "h", data, probe_prompts=[f"prompt {i}" for i in range(30)],
                      probe_max_s=0.001, probe_max_new_tokens=4, epochs=1)
    for ev in sink.of("probe"):
        assert 1 <= len(ev["probes"]) < 30, ev
    warnings = [e["message"] for e in sink.of("log") if e["level"] == "warning"]
    assert any("prompts skipped, the time budget (probe_max_s 0.001) was spent" in m for m in warnings), warnings
