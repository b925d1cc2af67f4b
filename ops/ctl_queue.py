"""trainer-ctl queue commands: add, list, show, remove, retry, prioritize.

A change goes through the daemon when it runs, else it is applied here under the daemon lock
(:func:`ops.ctl_common.submit`); list and show read the state db.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from core.atomic import fsync_dir
from core.paths import Layout
from core.statedb import StateDB
from core.states import JobState
from daemon.fsqueue import ERROR_SUFFIX
from daemon.intakefile import safe_name
from daemon import queueops
from ops.ctl_common import (REPLY_TIMEOUT_S, EXIT_FAIL, EXIT_OK, EXIT_USAGE, err, open_db, report,
                            submit)
from ops.describe import describe_data_report, describe_validation, fmt_count, fmt_num


def cmd_queue_add(layout: Layout, args: argparse.Namespace) -> int:
    src = Path(args.file)
    if not src.exists():
        err(f"{src}: no such file")
        return EXIT_USAGE
    if not src.is_file():
        err(f"{src}: not a regular file")
        return EXIT_USAGE
    name = safe_name(src.name)
    layout.inbox.mkdir(parents=True, exist_ok=True)
    staged = f".{name}.{uuid.uuid4().hex[:8]}.part"      # ignored by the inbox watcher
    dst = layout.inbox / staged
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        fsync_dir(layout.inbox)
        reply = queueops.submit(layout, "queue_add", {"staged": staged, "name": name, "priority": args.priority,
                                                      "force": args.force}, source="cli", timeout=REPLY_TIMEOUT_S)
    except BaseException:
        dst.unlink(missing_ok=True)      # the user's file is untouched; drop our partial copy
        raise
    if reply.how == "busy":              # nobody took the staged copy (on a timeout the daemon will)
        dst.unlink(missing_ok=True)
    return report(reply)


def cmd_queue_list(layout: Layout, args: argparse.Namespace) -> int:
    db = open_db(layout)
    jobs = []
    if db:
        states = [JobState(args.state)] if args.state else [JobState.PROCESSING, JobState.PENDING,
                                                            JobState.FAILED, JobState.DONE]
        for st in states:
            jobs += db.jobs(st)
        db.close()
    if args.json:
        print(json.dumps([j.to_json() for j in jobs], indent=2, default=str))
        return EXIT_OK
    if not jobs:
        print("queue is empty")
        return EXIT_OK
    print(f"{'ID':>4}  {'STATE':<10} {'PRIO':<6} {'RECORDS':>7} {'TRIES':>5}  NAME / ERROR")
    for j in jobs:
        line = f"{j.id:>4}  {j.state:<10} {j.priority:<6} {fmt_num(j.records, 'd'):>7} {j.attempts:>5}  {j.name}"
        if j.error:
            line += f"  ({j.error.splitlines()[0][:100]})"
        print(line)
    return EXIT_OK


def _find_job(db: StateDB, ref: str):
    job = db.by_name(ref) or db.by_original_name(ref)
    if job is None and ref.isdigit():
        job = db.get(int(ref))
    return job


def cmd_queue_show(layout: Layout, args: argparse.Namespace) -> int:
    db = open_db(layout)
    job = None
    if db:
        try:
            job = _find_job(db, args.name)
        finally:
            db.close()
    if job is None:
        err(f"no job named {args.name!r} in the queue (see `trainer-ctl queue list`)")
        return EXIT_FAIL
    error_file: dict[str, Any] = {}
    if job.state == JobState.FAILED.value:
        path = layout.state_dir(JobState.FAILED) / (job.name + ERROR_SUFFIX)
        try:
            error_file = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            error_file = {}
        if not isinstance(error_file, dict):
            error_file = {}
    d = job.to_json()
    if args.json:
        if isinstance(error_file.get("validation"), dict):
            d["validation"] = error_file["validation"]
        print(json.dumps(d, indent=2, default=str))
        return EXIT_OK
    print(f"job {job.id}: {job.name} ({job.state})")
    if job.original_name != job.name:
        print(f"  uploaded as:  {job.original_name}")
    facts = [f"priority {job.priority}", f"attempt{'s' if job.attempts != 1 else ''} {job.attempts}"]
    if job.records is not None:
        facts.append(fmt_count(job.records, "valid record"))
    if job.format:
        facts.append(job.format)
    if job.steps is not None:
        facts.append(f"{job.steps} steps")
    print("  " + " · ".join(facts))
    if job.sha256:
        print(f"  sha256:       {job.sha256}")
    for label, ts in (("added", job.created_at), ("started", job.started_at), ("finished", job.finished_at)):
        if ts:
            print(f"  {label + ':':<13} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))}")
    if job.error:
        print(f"  error:        {job.error}")
    report = d["data_report"]
    if report is not None:
        print("\n".join(describe_data_report(report)))
    elif job.state != JobState.FAILED.value or job.attempts:
        print("data report: none yet (the worker reports it when the job starts training)")
    if isinstance(error_file.get("validation"), dict):
        print("\n".join(describe_validation(error_file["validation"])))
    return EXIT_OK


def cmd_queue_remove(layout: Layout, args: argparse.Namespace) -> int:
    return submit(layout, "queue_remove", name=args.name)


def cmd_queue_retry(layout: Layout, args: argparse.Namespace) -> int:
    return submit(layout, "queue_retry", name=args.name, force=args.force)


def cmd_queue_prioritize(layout: Layout, args: argparse.Namespace) -> int:
    return submit(layout, "queue_prioritize", name=args.name, level=args.level)
