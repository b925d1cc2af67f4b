"""trainer-ctl commands that watch and steer the daemon: status, pause/resume/skip/stop, check,
monitor, logs."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core.config import Config, ConfigError, load_config
from core.diskfull import MIB, describe as describe_disk, free_bytes
from core.lock import daemon_running
from core.paths import Layout
from core.states import JobState
from daemon.status import read_status
from ops.ctl_common import EXIT_DOWN, EXIT_FAIL, EXIT_OK, open_db, send
from ops.describe import describe_preparing, fmt_eta, fmt_num


def cmd_status(layout: Layout, args: argparse.Namespace) -> int:
    pid = daemon_running(layout)
    status = read_status(layout) or {}
    db = open_db(layout)
    counts = db.counts() if db else {s.value: 0 for s in JobState}
    if db:
        db.close()
    if args.json:
        print(json.dumps({**status, "daemon_running": bool(pid), "daemon_pid": pid if pid and pid > 0 else None,
                          "queue": counts}, indent=2, default=str))
        return EXIT_OK if pid else EXIT_DOWN
    if pid:
        state = status.get("status", "starting")
        if state == "paused" and status.get("paused_reason"):
            state = f"paused: {status['paused_reason']}"
        print(f"trainerd: {state} (pid {pid}, up since {status.get('started_at', '?')})")
    else:
        last = f"last status '{status.get('status')}' at {status.get('updated_at')}" if status else "no status yet"
        print(f"trainerd: daemon not running ({last})")
    prep = status.get("preparing")
    training = status.get("total_steps") is not None       # the worker's "started" came
    if pid and status.get("current_file") and prep and not training:
        print(f"job:      {status['current_file']} (job {status.get('current_job_id')})  "
              f"{describe_preparing(prep)}")
    elif pid and status.get("current_file"):
        print(f"job:      {status['current_file']} (job {status.get('current_job_id')})  "
              f"step {status.get('current_step') or 0}/{status.get('total_steps') or '?'}  "
              f"loss {fmt_num(status.get('loss'), '.4f')}  lr {fmt_num(status.get('learning_rate'), '.2e')}  "
              f"{fmt_num(status.get('tokens_per_second'), ',.0f')} tok/s  ETA {fmt_eta(status.get('eta_seconds'))}"
              + (f"  on {status['ranks']} ranks" if (status.get("ranks") or 1) > 1 else ""))
        if prep:    # the rest of the file is tokenized while the first part trains
            print(f"          {describe_preparing(prep)} (the rest of the file, while training)")
    elif status.get("last_job"):
        j = status["last_job"]
        held = f" ({j.get('reason')})" if j.get("held") else ""
        print(f"last job: {j.get('file')} {j.get('outcome')}{held} after {j.get('steps')} steps, "
              f"loss {fmt_num(j.get('loss'), '.4f')} ({j.get('finished_at')})")
        if held:
            snap = Path(str((j.get("held") or {}).get("snapshot") or "?")).name
            print(f"          current_model/ unchanged; the adapter is snapshots/{snap} "
                  f"(trainer-ctl promote {snap})")
    print("queue:    " + " · ".join(f"{k} {v}" for k, v in counts.items()))
    chk = status.get("checking") if pid else None
    if isinstance(chk, dict):
        print(f"checking: inbox/{chk.get('file')} ({(chk.get('bytes') or 0) / MIB:,.0f} MiB: hashing and "
              f"validating, since {chk.get('since')})")
    if status.get("last_error"):
        e = status["last_error"]
        print(f"last error ({e.get('at')}): {e.get('message')}")
    if free_bytes(layout.home) < _min_free_mb(layout) * MIB:
        print(f"disk:     {describe_disk(layout.home)}: no job starts until min_free_disk_mb is free")
    return EXIT_OK if pid else EXIT_DOWN


def _min_free_mb(layout: Layout) -> float:
    try:
        return load_config(layout.config).min_free_disk_mb
    except ConfigError:
        return Config().min_free_disk_mb


def cmd_training(layout: Layout, args: argparse.Namespace) -> int:
    return send(layout, args.command)


def cmd_check(layout: Layout, args: argparse.Namespace) -> int:
    from ops.health import render, run_checks
    findings = run_checks(layout)
    if args.json:
        print(json.dumps([f.to_json() for f in findings], indent=2))
    else:
        print(render(findings))
    return EXIT_FAIL if any(f.level == "problem" for f in findings) else EXIT_OK


def cmd_monitor(layout: Layout, args: argparse.Namespace) -> int:
    from monitor.__main__ import main as monitor_main
    argv = ["--home", str(layout.home)]
    if args.host:
        argv += ["--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    return monitor_main(argv)


def cmd_logs(layout: Layout, args: argparse.Namespace) -> int:
    from core.logsetup import daemon_log_path, tail_lines
    daily = daemon_log_path(layout)
    files = ([("daemon", daily)] if daily else []) + [("train", layout.training_log)]
    offsets: dict[Path, int] = {}
    for tag, path in files:
        if not path.exists():
            continue
        for line in tail_lines(path, args.lines):
            print(f"[{tag}] {line}")
        offsets[path] = path.stat().st_size
    if not args.follow:
        return EXIT_OK
    try:
        while True:
            for tag, path in files:
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                start = offsets.get(path, 0)
                if size < start:
                    start = 0
                if size > start:
                    with open(path, "rb") as fh:
                        fh.seek(start)
                        chunk = fh.read(size - start).decode("utf-8", errors="replace")
                    for line in chunk.splitlines():
                        print(f"[{tag}] {line}", flush=True)
                    offsets[path] = size
            time.sleep(0.5)
    except KeyboardInterrupt:
        return EXIT_OK
