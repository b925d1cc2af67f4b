"""The throughput benchmark runs end to end on the tiny model (no timing is asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_throughput_tiny_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_throughput.py"), "--model", "tiny", "--device", "cpu",
         "--steps", "2", "--warmup", "1", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["recipes"]) == {"A", "C", "ours"}
    for name, r in report["recipes"].items():
        assert r["tokens_per_s"] > 0 and r["real_tokens_per_step"] > 0, name
        assert 0.0 <= r["padding_fraction"] < 1.0, name
        assert r["peak_memory_bytes"] > 0, name
    # same examples for A and C, C computes the most padding, ours packs several per row
    assert report["recipes"]["A"]["real_tokens_per_step"] == report["recipes"]["C"]["real_tokens_per_step"]
    assert report["recipes"]["C"]["padding_fraction"] > report["recipes"]["A"]["padding_fraction"]
    assert report["recipes"]["ours"]["real_tokens_per_step"] > report["recipes"]["A"]["real_tokens_per_step"]
    check = report["correctness"]
    assert check["passed"] is True and check["relative_difference"] < 1e-5   # correct: ~5e-8
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(report["versions"])
    assert "--model tiny" in report["command"]
    assert "| ours |" in proc.stdout
