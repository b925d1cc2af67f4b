"""Written weights get the mode of the files beside them (safetensors alone wrote 0600)."""
from __future__ import annotations

import json
from pathlib import Path

from core.atomic import default_file_mode
from core.config import Config, config_to_dict
from daemon.generator import generate_records
from core.interface import Outcome
from trainer.recipe import QLoRATrainer
from trainer.train import make_job
from trainer_helpers import ListSink, NoControl


def modes(directory: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mode & 0o777 for f in directory.iterdir() if f.is_file()}


def test_the_tiny_base_and_a_trained_adapter_have_one_file_mode(tiny_base: Path, tmp_path: Path) -> None:
    want = default_file_mode()
    base = modes(tiny_base)
    assert base["model.safetensors"] == base["config.json"] == want, base
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_records(16, seed=2)))
    cfg = config_to_dict(Config(base_model=str(tiny_base), max_length=64, batch_size=2, lora_r=4,
                                checkpoint_every_steps=2, layer_activity_every_steps=1000))
    sink = ListSink()
    result = QLoRATrainer().run(make_job(data, tmp_path / "home", cfg, job_id=1), sink, NoControl())
    assert result.outcome is Outcome.COMPLETED
    for d in [tmp_path / "home" / "current_model", *(tmp_path / "home" / "snapshots").iterdir()]:
        m = modes(d)
        assert m["adapter_model.safetensors"] == m["adapter_config.json"] == want, (d, m)
