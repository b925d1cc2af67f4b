"""bench/gpu_bench.sh --smoke: the GPU bench runs end to end on CPU (tiny base), so it never rots."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_recipe(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "GPU_BENCH_TIMEOUT_S": "300"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_bench.sh"), "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_bench_smoke.json").read_text())
    assert (tmp_path / "gpu_bench_smoke.md").read_text().startswith("GPU bench on CPU")
    for name in ("A", "ours"):
        r = res["recipes"][name]
        assert r["status"] == "ran", r
        assert r["real_tokens_per_s"] > 0 and r["steps_timed"] == res["steps"] and 0 < r["mfu"] < 1
        assert math.isfinite(r["final_loss"])
    b = res["recipes"]["B"]
    assert b["status"] == "ran" or b["status"].startswith("not run: trl not installed"), b
    assert res["packed_check"]["status"] == "ran" and res["packed_check"]["passed"], res["packed_check"]
    assert res["matmul_peak"]["flops_per_s"] > 0 and res["versions"]["torch"]
