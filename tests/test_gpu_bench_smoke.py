"""bench/gpu_bench.sh --smoke: the GPU bench runs end to end on CPU (tiny base), so the script a
GPU session runs once is known to work before it gets there."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_bench_smoke_runs_a_and_c(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_BENCH_TIMEOUT_S": "170",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_bench.sh"), "--smoke"], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_bench_smoke.json").read_text())
    md = (tmp_path / "gpu_bench_smoke.md").read_text()
    assert md.startswith("GPU bench on CPU") and "| C | ours" in md and "| A | HF Trainer" in md
    assert "| C | ours" in proc.stdout                     # the table is printed too
    assert (tmp_path / "gpu_bench_smoke.log").stat().st_size > 0

    data = res["data"]
    assert data["examples"] == res["records"] and data["tokens"] > 0
    for name in ("A", "C"):
        r = res["recipes"][name]
        assert r["status"] == "ran", r
        assert r["real_tokens_per_s"] > 0 and r["padded_tokens_per_s"] >= r["real_tokens_per_s"]
        assert r["timed_steps"] >= 1 and r["tokens_trained"] > 0
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["final_loss"])
        assert math.isfinite(r["loss_at_common_tokens"])
        assert r["peak_memory_bytes"] > 0 and 0 < r["mfu"] < 1 and 0 < r["mfu_useful"] < 1
    # A pads each batch to its longest example; C packs several examples a row
    assert res["recipes"]["A"]["padding_fraction"] > res["recipes"]["C"]["padding_fraction"]
    assert res["recipes"]["C"]["vs_A"] > 0
    # the same tokens: both train the whole epoch unless their time cap stopped them
    for name in ("A", "C"):
        r = res["recipes"][name]
        assert r["tokens_trained"] == data["tokens"] or r["capped"], r
    b = res["recipes"]["B"]
    assert b["status"] == "ran" or b["status"].startswith("not run: trl not installed"), b
    if b["status"] == "ran":
        assert b["real_tokens_per_s"] > 0 and math.isfinite(b["final_loss"])

    assert res["common_tokens"] > 0
    assert res["matmul_peak"]["flops_per_s"] > 0 and res["versions"]["torch"]
    assert {"transformers", "peft", "bitsandbytes", "trl", "cuda", "driver"} <= set(res["versions"])
    assert res["defaults"]["lora_r"] == 16 and res["defaults"]["lora_target_modules"] == "all-linear"
    check = res.get("packed_check", {})
    assert check.get("status") != "ran" or check["passed"], check


@pytest.mark.slow
def test_gpu_bench_nproc_runs_c_on_two_ranks(tmp_path: Path) -> None:
    """``--nproc 2``: C again under torchrun (gloo here), 8 rows per rank a step, and the scaling
    efficiency against C (on 2 shared CPU cores the figure itself means nothing; on N GPUs it is
    the issue's >= 90 % goal)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_BENCH_TIMEOUT_S": "170",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_bench.sh"), "--smoke", "--nproc", "2", "--recipes", "C",
                           "--check", "off"], cwd=REPO, env=env, check=False, capture_output=True, text=True,
                          timeout=200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_bench_smoke.json").read_text())
    c, ranks = res["recipes"]["C"], res["recipes"]["C-ranks"]
    assert c["status"] == "ran" and ranks["status"] == "ran", ranks
    assert res["nproc"] == 2 and 0 < ranks["scaling_efficiency"] < 2
    # the same data: C-ranks's step is twice C's (8 rows on each of 2 ranks)
    assert ranks["tokens_trained"] == c["tokens_trained"] == res["data"]["tokens"] or ranks["capped"] or c["capped"]
    assert ranks["timed_steps"] < c["timed_steps"] and math.isfinite(ranks["loss_at_common_tokens"])
    assert "C-ranks: 2 ranks reach" in (tmp_path / "gpu_bench_smoke.md").read_text()
