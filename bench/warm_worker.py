"""Idle time between queued files: a fresh worker per file (cold) vs the warm worker.

    python bench/warm_worker.py [--files 4] [--records 48] [--out bench/results/warm_worker.json]

Each mode is a real daemon (``python -m daemon --burst``) on its own base dir with the embedded
tiny base, trainer "qlora", the same files dropped at once. Cold is ``worker_idle_exit_s: 0``
(the worker ends with each job: what every file cost before the warm worker); warm is the default.
From state.db's events and status/metrics.jsonl, per pair of consecutive files:

- idle: job k "completed" (the daemon moved the file to done/) -> job k+1's first step
  (the GPU does nothing meanwhile: worker start, torch import, base load, data preparation);
- step gap: job k's last step -> job k+1's first step (adds job k's final checkpoint, adapter
  publication, snapshot).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.generator import generate_records  # noqa: E402
from trainer.tiny_base import build_tiny_base  # noqa: E402

MODES = {"cold": {"worker_idle_exit_s": 0}, "warm": {}}


def run_mode(work: Path, base: Path, mode: str, files: int, records: int) -> dict[str, Any]:
    home = work / mode
    for d in ("inbox", "status", "logs"):
        (home / d).mkdir(parents=True, exist_ok=True)
    cfg = {"trainer": "qlora", "base_model": str(base), "max_length": 128, "batch_size": 2,
           "gradient_accumulation": 1, "checkpoint_every_steps": 1000, "layer_activity_every_steps": 1000,
           "inbox_stable_seconds": 0, **MODES[mode]}
    (home / "config.json").write_text(json.dumps(cfg, indent=2))
    for i in range(files):
        p = home / "inbox" / f"{i:02d}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in generate_records(records, seed=100 + i)))
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    env = {**os.environ, "TRAINER_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "daemon", "--burst", "--quiet"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: daemon exited {proc.returncode}: {proc.stderr[-2000:]}")
    db = sqlite3.connect(home / "status" / "state.db")
    completed = {j: ts for ts, j in db.execute("SELECT ts, job_id FROM events WHERE kind = 'completed'")}
    db.close()
    steps: dict[int, list[float]] = {}
    for line in (home / "status" / "metrics.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev.get("event") == "step":
            steps.setdefault(int(ev["job_id"]), []).append(float(ev["time"]))
    jobs = sorted(steps)
    if len(jobs) != files or sorted(completed) != jobs:
        raise SystemExit(f"{mode}: expected {files} completed jobs, got steps for {jobs}, completed {sorted(completed)}")
    idle = [min(steps[b]) - completed[a] for a, b in zip(jobs, jobs[1:])]
    gap = [min(steps[b]) - max(steps[a]) for a, b in zip(jobs, jobs[1:])]
    log = (home / "logs" / "training_output.log").read_text()
    return {"idle_s": [round(x, 3) for x in idle], "idle_median_s": round(statistics.median(idle), 3),
            "step_gap_s": [round(x, 3) for x in gap], "step_gap_median_s": round(statistics.median(gap), 3),
            "workers_started": log.count("===== worker:"), "jobs": len(jobs), "wall_s": round(wall, 2),
            "config": cfg}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--records", type=int, default=48)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "warm_worker.json")
    args = ap.parse_args(argv)
    import tempfile
    work = args.workdir or Path(tempfile.mkdtemp(prefix="warm-worker-"))
    base = build_tiny_base(work / "tiny-base", seed=0)
    res: dict[str, Any] = {
        "command": "python bench/warm_worker.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "files": args.files, "records_per_file": args.records, "modes": {}}
    for mode in MODES:
        res["modes"][mode] = run_mode(work, base, mode, args.files, args.records)
    import torch
    import transformers
    res["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print("| mode | workers started | idle between files (median, each) | last step -> next first step (median) | wall |")
    print("|---|---|---|---|---|")
    for mode, r in res["modes"].items():
        print(f"| {mode} | {r['workers_started']} for {r['jobs']} files | {r['idle_median_s']:.2f} s "
              f"({', '.join(f'{x:.2f}' for x in r['idle_s'])}) | {r['step_gap_median_s']:.2f} s | {r['wall_s']:.1f} s |")
    print(f"\nresult: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
