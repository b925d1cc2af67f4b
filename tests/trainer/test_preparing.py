"""Data preparation is reported as progress before the first step (issue 10, item 2, in part):
``preparing`` events from the worker, shown by trainer-ctl status and the dashboard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import Config, config_to_dict
from ops.describe import describe_preparing
from trainer import tokenbuild
from daemon.generator import generate_records
from core.interface import Outcome
from trainer.recipe import QLoRATrainer, _RecipeRun
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl


def test_preparation_is_reported_as_progress_before_the_first_step(tiny_base: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_RecipeRun, "PREPARING_EVERY_S", 0.0)      # every batch: a visible trail
    monkeypatch.setattr(tokenbuild, "BLOCK", 8)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_records(40, seed=0)), encoding="utf-8")
    cfg = config_to_dict(Config(base_model=str(tiny_base), max_length=64, batch_size=4, lora_r=4,
                                checkpoint_every_steps=1000))
    sink = ListSink()
    result = QLoRATrainer().run(make_job(data, tmp_path / "home", cfg, job_id=1), sink, NoControl())
    assert result.outcome is Outcome.COMPLETED, result.reason
    kinds = [e["event"] for e in sink.events]
    prep = sink.of("preparing")
    assert prep and max(i for i, k in enumerate(kinds) if k == "preparing") < kinds.index("started")
    assert prep[0]["phase"] == "validating"
    tok = [e for e in prep if e["phase"] == "tokenizing"]
    done = [e["done"] for e in tok]
    assert done == sorted(done) and done[-1] == 40 and {e["total"] for e in tok} == {40}
    assert all(d % 8 == 0 for d in done)                               # whole blocks of 8 lines
    assert tok[-1]["percent"] == 100.0 and tok[-1]["eta_seconds"] == 0.0
    assert all(e["records_per_second"] > 0 for e in tok[1:])          # the first has no rate yet


def test_the_default_throttle_still_reports_the_end(tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_records(40, seed=1)), encoding="utf-8")
    cfg = config_to_dict(Config(base_model=str(tiny_base), max_length=64, batch_size=4, lora_r=4))
    sink = ListSink()
    QLoRATrainer().run(make_job(data, tmp_path / "home", cfg, job_id=1), sink, NoControl())
    tok = [e for e in sink.of("preparing") if e["phase"] == "tokenizing"]
    assert tok[-1]["done"] == tok[-1]["total"] == 40 and len(tok) < 40


def test_status_line_for_preparation() -> None:
    assert describe_preparing({"phase": "validating"}) == "preparing data (validating the file)"
    line = describe_preparing({"phase": "tokenizing", "done": 41200, "total": 100000, "percent": 41.2,
                               "records_per_second": 2100.0, "eta_seconds": 28.0})
    assert line == "preparing data 41 % (41,200 / 100,000 records, 2,100 records/s, ETA 0m28s)"
