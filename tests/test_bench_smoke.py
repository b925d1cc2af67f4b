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


@pytest.mark.slow
def test_bench_data_scale_smoke(tmp_path: Path) -> None:
    """bench/data_scale.py through the real launcher, daemon and worker, on 300 records."""
    out = tmp_path / "data_scale.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "data_scale.py"), "--records", "300", "--max-length", "128",
         "--timeout-s", "400", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["records"] == 300
    for key in ("file_mb", "file_bytes", "landing_to_first_step_s", "resume_to_first_step_s",
                "peak_worker_rss_mb", "peak_daemon_rss_mb"):
        assert report[key] > 0, key
    assert 380 < report["calibration"]["tokens_mean"] < 560       # ~470 tokens per record
    moments = report["first_run"]["moments_s"]
    assert 0 <= moments["accepted"] <= moments["claimed"] <= moments["first_step"]
    assert report["first_run"]["first_step"]["step"] == 1
    assert report["resume_run"]["first_step"]["step"] > report["checkpoint"]["step"] >= 2
    assert report["killed"]["all_gone"] and report["clean_stop"]
    assert {"cpu_count", "python", "torch", "transformers", "tokenizers"} <= set(report["machine"])
    assert "| landing → first step s |" in proc.stdout
