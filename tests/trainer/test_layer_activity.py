"""Layer activity: cheap ||B A||_F, one row per LoRA module, aggregates, after real training."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from core.config import Config, config_to_dict
from daemon.generator import generate_records
from core.interface import Outcome
from trainer.layer_activity import lora_delta_norm
from trainer.recipe import QLoRATrainer
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl


@pytest.mark.parametrize("r,din,dout", [(1, 7, 5), (4, 64, 128), (16, 300, 40)])
def test_delta_norm_matches_materialised_product(r: int, din: int, dout: int) -> None:
    g = torch.Generator().manual_seed(r)
    A = torch.randn(r, din, generator=g)
    B = torch.randn(dout, r, generator=g)
    expected = float(torch.linalg.matrix_norm((B.double() @ A.double()) * 0.5, ord="fro"))
    assert lora_delta_norm(A, B, 0.5) == pytest.approx(expected, rel=1e-9)
    assert lora_delta_norm(A, torch.zeros(dout, r), 2.0) == 0.0  # a fresh LoRA (B = 0)


@pytest.mark.slow
def test_layer_activity_after_training(tiny_base: Path, tmp_path: Path) -> None:
    data = tmp_path / "la.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_records(24, seed=4)))
    cfg = config_to_dict(Config(base_model=str(tiny_base), max_length=128, batch_size=2, lora_r=4,
                                learning_rate=5e-3, epochs=2, layer_activity_every_steps=2,
                                checkpoint_every_steps=1000))
    sink = ListSink()
    result = QLoRATrainer().run(make_job(data, tmp_path / "home", cfg, job_id=1), sink, NoControl())
    assert result.outcome is Outcome.COMPLETED, result.reason
    reports = [e for e in sink.events if e["event"] == "layer_activity"]
    assert len(reports) == result.steps // 2 and [r["step"] for r in reports] == list(range(2, result.steps + 1, 2))

    # tiny Qwen3: 2 layers x (q, k, v, o, gate, up, down) = 14 LoRA modules
    types = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for rep in reports:
        rows = rep["table"]["modules"]
        assert len(rows) == 14 and len({r["module"] for r in rows}) == 14
        assert {r["type"] for r in rows} == types and {r["layer"] for r in rows} == {0, 1}
        for row in rows:
            for key in ("delta_norm", "grad_norm", "grad_norm_A", "grad_norm_B", "delta_change"):
                assert math.isfinite(row[key]), (row, key)
            assert row["delta_norm"] > 0 and row["grad_norm"] > 0, row
        layers = rep["table"]["layers"]
        assert [l["layer"] for l in layers] == [0, 1] and all(l["modules"] == 7 for l in layers)
        by_type = {t["type"]: t for t in rep["table"]["module_types"]}
        assert set(by_type) == types and all(t["modules"] == 2 for t in by_type.values())
        # aggregates are the Frobenius norm of the group
        q = [r["delta_norm"] for r in rows if r["type"] == "q_proj"]
        assert by_type["q_proj"]["delta_norm"] == pytest.approx(math.hypot(*q))
        summary = rep["summary"]
        assert len(summary) == 10
        changes = [abs(s["delta_change"]) for s in summary]
        assert changes == sorted(changes, reverse=True)
        assert changes[-1] >= max(abs(r["delta_change"]) for r in rows if r["module"] not in
                                  {s["module"] for s in summary})
    # first report: change since the job started (a fresh LoRA has delta 0) equals the norm itself
    first = reports[0]["table"]["modules"]
    assert all(r["delta_change"] == pytest.approx(r["delta_norm"]) for r in first)
    # later report: change is relative to the previous report
    prev = {r["module"]: r["delta_norm"] for r in reports[-2]["table"]["modules"]}
    for r in reports[-1]["table"]["modules"]:
        assert r["delta_change"] == pytest.approx(r["delta_norm"] - prev[r["module"]])
