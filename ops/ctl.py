"""trainer-ctl: steer the daemon and its queue, from the shell or over ssh.

Training commands go to the running daemon as control requests. Queue changes go through the
daemon when it runs; when it does not, trainer-ctl takes the daemon lock and applies them
itself, so there is never more than one writer of the queue.

Exit codes: 0 ok, 1 refused/failed, 2 bad usage or input, 3 daemon not running,
4 daemon did not answer in time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_json, durable_rename, fsync_dir
from core.config import LOCKED_KEYS, Config, ConfigError, base_model_value, load_config, locked_namespace
from core.diskfull import MIB, describe as describe_disk, free_bytes, is_disk_full
from core.lock import daemon_running
from core.paths import Layout
from core.statedb import StateDB
from core.states import JobState, Priority
from daemon import control as ctl, queueops
from daemon.fsqueue import ERROR_SUFFIX, safe_name
from daemon.status import read_status

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_DOWN, EXIT_TIMEOUT = 0, 1, 2, 3, 4
REPLY_TIMEOUT_S = 15.0


def _err(msg: str) -> None:
    print(f"trainer-ctl: {msg}", file=sys.stderr)


def _fmt_num(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _fmt_eta(s: Any) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _db(layout: Layout) -> StateDB | None:
    if not layout.state_db.exists():
        return None
    return StateDB(layout.state_db, readonly=True)


# ---- status ---------------------------------------------------------------------------------
def cmd_status(layout: Layout, args: argparse.Namespace) -> int:
    pid = daemon_running(layout)
    status = read_status(layout) or {}
    db = _db(layout)
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
              f"loss {_fmt_num(status.get('loss'), '.4f')}  lr {_fmt_num(status.get('learning_rate'), '.2e')}  "
              f"{_fmt_num(status.get('tokens_per_second'), ',.0f')} tok/s  ETA {_fmt_eta(status.get('eta_seconds'))}")
        if prep:    # the rest of the file is tokenized while the first part trains
            print(f"          {describe_preparing(prep)} (the rest of the file, while training)")
    elif status.get("last_job"):
        j = status["last_job"]
        print(f"last job: {j.get('file')} {j.get('outcome')} after {j.get('steps')} steps, "
              f"loss {_fmt_num(j.get('loss'), '.4f')} ({j.get('finished_at')})")
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


def describe_preparing(p: dict[str, Any]) -> str:
    """"preparing data 37 % (41,200 / 100,000 records, 2,100 records/s, ETA 28s)"."""
    if p.get("phase") != "tokenizing" or not p.get("total"):
        return "preparing data (validating the file)"
    extra = ""
    if p.get("records_per_second"):
        extra = f", {p['records_per_second']:,.0f} records/s, ETA {_fmt_eta(p.get('eta_seconds'))}"
    return (f"preparing data {p.get('percent') or 0:.0f} % ({p.get('done') or 0:,} / {p['total']:,} "
            f"records{extra})")


def _min_free_mb(layout: Layout) -> float:
    try:
        return load_config(layout.config).min_free_disk_mb
    except ConfigError:
        return Config().min_free_disk_mb


# ---- training commands ------------------------------------------------------------------------
def send(layout: Layout, command: str, **cargs: Any) -> int:
    pid = daemon_running(layout)
    if not pid:
        _err(f"daemon not running: cannot {command.replace('_', ' ')} (start it with bin/launch_training_daemon.sh)")
        return EXIT_DOWN
    req = ctl.write_request(layout, command, source="cli", **cargs)
    reply = ctl.wait_reply(layout, req, REPLY_TIMEOUT_S)
    if reply is None:
        _err(f"daemon (pid {pid}) did not answer within {REPLY_TIMEOUT_S:.0f} s; the request stays in control/")
        return EXIT_TIMEOUT
    print(reply["message"]) if reply["ok"] else _err(reply["message"])
    return EXIT_OK if reply["ok"] else EXIT_FAIL


def cmd_training(layout: Layout, args: argparse.Namespace) -> int:
    return send(layout, args.command)


# ---- queue ------------------------------------------------------------------------------------
def _submit(layout: Layout, command: str, **args: Any) -> int:
    """A queue operation, through the daemon if it runs, else applied here under its lock."""
    reply = queueops.submit(layout, command, args, source="cli", timeout=REPLY_TIMEOUT_S)
    print(reply.message) if reply.ok else _err(reply.message)
    if reply.how in ("timeout", "busy"):
        return EXIT_TIMEOUT
    return EXIT_OK if reply.ok else EXIT_FAIL


def cmd_queue_add(layout: Layout, args: argparse.Namespace) -> int:
    src = Path(args.file)
    if not src.exists():
        _err(f"{src}: no such file")
        return EXIT_USAGE
    if not src.is_file():
        _err(f"{src}: not a regular file")
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
        rc = _submit(layout, "queue_add", staged=staged, name=name, priority=args.priority, force=args.force)
    except BaseException:
        dst.unlink(missing_ok=True)      # the user's file is untouched; drop our partial copy
        raise
    if rc == EXIT_TIMEOUT and not daemon_running(layout):   # nobody will take the staged copy
        dst.unlink(missing_ok=True)
    return rc


def cmd_queue_list(layout: Layout, args: argparse.Namespace) -> int:
    db = _db(layout)
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
        line = f"{j.id:>4}  {j.state:<10} {j.priority:<6} {_fmt_num(j.records, 'd'):>7} {j.attempts:>5}  {j.name}"
        if j.error:
            line += f"  ({j.error.splitlines()[0][:100]})"
        print(line)
    return EXIT_OK


def _count(n: Any, one: str, many: str | None = None) -> str:
    if not isinstance(n, int) or isinstance(n, bool):
        return f"{n} {many or one + 's'}"
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _lines_text(lines: Any, count: Any) -> str:
    """"lines 4, 9, …" (the ellipsis when the count says there are more than listed)."""
    if not isinstance(lines, list) or not lines:
        return ""
    more = isinstance(count, int) and count > len(lines)
    return ("line " if len(lines) == 1 and not more else "lines ") + \
        ", ".join(str(x) for x in lines) + (", …" if more else "")


def describe_reason(name: str, r: Any, unit: str = "record") -> str:
    """"truncated: 12 records (1,234 tokens cut), lines 4, 9, …" (any extra keys are shown too)."""
    if not isinstance(r, dict):
        return f"{name}: {r}"
    count = r.get("count")
    out = f"{name}: {_count(count, unit)}" if count is not None else f"{name}:"
    notes = []
    if r.get("tokens_cut") is not None:
        notes.append(f"{_fmt_int(r['tokens_cut'])} tokens cut")
    for k, v in r.items():
        if k not in ("count", "lines", "tokens_cut", "message"):
            notes.append(f"{k.replace('_', ' ')} {_fmt_int(v)}")
    if notes:
        out += f" ({', '.join(notes)})"
    lines = _lines_text(r.get("lines"), count)
    if lines:
        out += f", {lines}"
    if r.get("message"):
        out += f" — {r['message']}"
    return out


def _fmt_int(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


REPORT_LABELS = (("records", "records"), ("examples", "examples"), ("tokens", "tokens"),
                 ("trained_tokens", "trained tokens"), ("tokens_cut", "tokens cut"))


def describe_data_report(report: dict[str, Any]) -> list[str]:
    """The worker's data report as lines: the totals, then one line per reason."""
    how = [f"{k.replace('_', ' ')} {report[k]}" for k in ("format", "truncation", "max_length")
           if report.get(k) is not None]
    out = ["data report" + (f" ({', '.join(how)})" if how else "") + ":"]
    width = max(len(label) for _, label in REPORT_LABELS) + 1
    for key, label in REPORT_LABELS:
        if report.get(key) is not None:
            out.append(f"  {label + ':':<{width}} {_fmt_int(report[key])}")
    shown = {k for k, _ in REPORT_LABELS} | {"format", "truncation", "max_length", "reasons"}
    reasons = report.get("reasons") if isinstance(report.get("reasons"), dict) else {}
    for k, v in report.items():     # keys of a newer worker that this version does not know
        if k not in shown and k not in reasons and not isinstance(v, (dict, list)) and v not in (0, None):
            out.append(f"  {k.replace('_', ' ') + ':':<{width}} {_fmt_int(v)}")
    if reasons:
        out += [f"  {describe_reason(str(name), r)}" for name, r in reasons.items()]
    else:
        out.append("  nothing truncated, dropped or skipped")
    return out


def describe_validation(v: dict[str, Any]) -> list[str]:
    """The intake validation report kept in failed/NAME.error.json, as lines."""
    out = [f"intake validation: {_fmt_int(v.get('valid_records'))} of {_fmt_int(v.get('records'))} "
           f"records valid" + (f" ({v['format']})" if v.get("format") else "")]
    by_kind: dict[str, list[int]] = {}
    for e in v.get("errors") or []:
        if isinstance(e, dict):
            by_kind.setdefault(str(e.get("kind")), []).append(e.get("line"))
    counts = v.get("error_counts") if isinstance(v.get("error_counts"), dict) else {}
    for kind in list(counts) + [k for k in by_kind if k not in counts]:
        lines = by_kind.get(kind, [])
        out.append("  " + describe_reason(kind, {"count": counts.get(kind, len(lines)), "lines": lines},
                                          unit="line"))
    return out


def _find_job(db: StateDB, ref: str):
    job = db.by_name(ref) or db.by_original_name(ref)
    if job is None and ref.isdigit():
        job = db.get(int(ref))
    return job


def cmd_queue_show(layout: Layout, args: argparse.Namespace) -> int:
    db = _db(layout)
    job = None
    if db:
        try:
            job = _find_job(db, args.name)
        finally:
            db.close()
    if job is None:
        _err(f"no job named {args.name!r} in the queue (see `trainer-ctl queue list`)")
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
        facts.append(_count(job.records, "valid record"))
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
    return _submit(layout, "queue_remove", name=args.name)


def cmd_queue_retry(layout: Layout, args: argparse.Namespace) -> int:
    return _submit(layout, "queue_retry", name=args.name, force=args.force)


def cmd_queue_prioritize(layout: Layout, args: argparse.Namespace) -> int:
    return _submit(layout, "queue_prioritize", name=args.name, level=args.level)


# ---- config -----------------------------------------------------------------------------------
def _namespace(layout: Layout) -> str:
    try:
        return locked_namespace(json.loads(layout.config.read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, AttributeError):
        return ""


def cmd_config_unlock(layout: Layout, args: argparse.Namespace) -> int:
    layout.status_dir.mkdir(parents=True, exist_ok=True)
    ns = _namespace(layout)
    db = StateDB(layout.state_db)
    try:
        was = db.locked(ns).get(args.key)
        removed = db.unlock(args.key, ns)
        if removed:
            db.add_event("unlocked", f"locked key {args.key} unlocked by trainer-ctl (was {was!r})", level="warning")
    finally:
        db.close()
    if not removed:
        print(f"{args.key} was not locked; the value in config.json is recorded when the next job starts")
    else:
        print(f"unlocked {args.key} (was {was!r}); the value in config.json is recorded when the next job starts")
    return EXIT_OK


def cmd_config_show(layout: Layout, args: argparse.Namespace) -> int:
    try:
        cfg = load_config(layout.config)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    db = _db(layout)
    locked = db.locked(cfg.locked_namespace) if db else {}
    if db:
        db.close()
    print(json.dumps({"config": cfg.model_dump(mode="json"), "locked": locked}, indent=2))
    return EXIT_OK


# ---- models and data ----------------------------------------------------------------------------
def cmd_init_base(layout: Layout, args: argparse.Namespace) -> int:
    if not args.tiny:
        _err("only --tiny is supported: point config.json's base_model at your own local model folder")
        return EXIT_USAGE
    from trainer.tiny_base import build_tiny_base
    name = args.name or time.strftime("%Y%m%d_%H%M%S") + "_tiny"
    if "/" in name or name.startswith("."):
        _err(f"bad name {name!r}")
        return EXIT_USAGE
    out = layout.consolidated / name
    if out.exists():
        _err(f"{out} already exists")
        return EXIT_FAIL
    layout.consolidated.mkdir(parents=True, exist_ok=True)
    build_tiny_base(out, seed=args.seed)
    print(f"built tiny base in {out}")
    raw = json.loads(layout.config.read_text()) if layout.config.exists() else {}
    current = raw.get("base_model")
    usable = current and (Path(current) if Path(current).is_absolute() else layout.home / current).is_dir()
    if args.set_default or not usable:
        try:
            rel = out.relative_to(layout.home)
        except ValueError:
            rel = out
        raw["base_model"] = str(rel)
        atomic_write_json(layout.config, raw)
        print(f"config.json: base_model = {rel}")
    return EXIT_OK


def cmd_generate(layout: Layout, args: argparse.Namespace) -> int:
    from daemon.generator import generate_records, write_jsonl_atomic
    out = Path(args.out) if args.out else layout.inbox
    out.mkdir(parents=True, exist_ok=True)
    path = write_jsonl_atomic(generate_records(args.count, seed=args.seed), out)
    print(f"wrote {args.count} records to {path}")
    return EXIT_OK


# ---- adapters and bases -------------------------------------------------------------------------
def _raw_config(layout: Layout) -> dict[str, Any]:
    """config.json as written, with ``base_model`` resolved through the active preset."""
    raw = json.loads(layout.config.read_text(encoding="utf-8")) if layout.config.exists() else {}
    return {**raw, "base_model": base_model_value(raw)}


def cmd_snapshot(layout: Layout, args: argparse.Namespace) -> int:
    from ops.consolidate import ConsolidationError, snapshot_now
    try:
        path = snapshot_now(layout.home, args.description)
    except ConsolidationError as exc:
        if is_disk_full(exc):       # the one-line disk-full answer of main()
            raise
        _err(str(exc))
        return EXIT_FAIL
    print(f"snapshot written: {path}")
    return EXIT_OK


def cmd_lineage(layout: Layout, args: argparse.Namespace) -> int:
    from ops.consolidate import lineage
    chain = lineage(layout.home, _raw_config(layout))
    if args.json:
        print(json.dumps(chain, indent=2, default=str))
        return EXIT_OK
    for i, node in enumerate(chain):
        kind = node.get("kind")
        where = node.get("path") or "current_model/"
        desc = f" — {node['description']}" if node.get("description") else ""
        fp = f" [{str(node.get('fingerprint') or node.get('base_fingerprint') or '')[:12]}]"
        print(f"{'  ' * i}{'└─ ' if i else ''}{kind}: {where}{fp if fp != ' []' else ''}{desc}")
        for ds in node.get("datasets") or []:
            name = ds.get("name") or ds.get("dataset") or "?"
            print(f"{'  ' * i}     · {name} ({str(ds.get('sha256', ''))[:12]})")
    return EXIT_OK


def cmd_consolidate(layout: Layout, args: argparse.Namespace) -> int:
    """Merge current_model/ into a new base. Needs no job mid-way; --pause makes it so."""
    from ops.consolidate import ConsolidationError, consolidate
    pid = daemon_running(layout)
    status = read_status(layout) or {}
    midway = sorted(p.name for p in layout.checkpoints.glob("job-*") if p.is_dir())
    busy = status.get("current_file") if pid else None
    if (busy or midway) and not args.pause:
        what = f"{busy} is training (step {status.get('current_step')} of {status.get('total_steps')})" \
            if busy else f"{', '.join(midway)} stopped mid-way (its checkpoints are on the current base)"
        _err(f"refused: {what}. Rerun with --pause to stop at the next step, consolidate, and restart "
             "that job from its start on the new base (its checkpoints are kept aside)")
        return EXIT_FAIL
    if pid:
        print(f"stopping the daemon (pid {pid}) for the consolidation")
        rc = send(layout, "stop")
        if rc != EXIT_OK:
            return rc
        deadline = time.monotonic() + 600
        while daemon_running(layout) and time.monotonic() < deadline:
            time.sleep(0.2)
        if daemon_running(layout):
            _err("the daemon did not stop within 10 minutes; consolidation not started")
            return EXIT_TIMEOUT
    rc = EXIT_OK
    moved: list[tuple[Path, Path]] = []
    try:
        midway = sorted(p for p in layout.checkpoints.glob("job-*") if p.is_dir())
        if midway:
            aside = layout.checkpoints / f".superseded-{time.strftime('%Y%m%d_%H%M%S')}"
            aside.mkdir(parents=True)
            fsync_dir(layout.checkpoints)
            for d in midway:
                durable_rename(d, aside / d.name)
                moved.append((aside / d.name, d))
            print(f"set aside checkpoints of {', '.join(d.name for d in midway)} in {aside}")
        result = consolidate(layout.home, _raw_config(layout), args.description)
        print(f"consolidated into {result['new_base_path']}\n"
              f"  parent:    {result['parent_base']}\n"
              f"  datasets:  {len(result['datasets'])}\n"
              f"  probe:     max |merged - (base+adapter)| = {result['probe_max_abs_diff']:.2e} "
              f"(tolerance {result['probe_tolerance']:.0e})\n"
              f"  backup:    {result['backup']}\n"
              f"config.json base_model is now {result['new_base']}; the next job starts a fresh adapter")
    except ConsolidationError as exc:
        _err(f"consolidation refused: {exc}")
        rc = EXIT_FAIL
        for src, dst in moved:           # the base did not change: the job resumes as it was
            durable_rename(src, dst)
        if moved:
            print("checkpoints put back; the interrupted job resumes where it stopped")
    finally:
        if pid:
            from daemon.launcher import launch
            launch(layout)
    return rc


def cmd_preset(layout: Layout, args: argparse.Namespace) -> int:
    if args.name is None:
        raw = json.loads(layout.config.read_text(encoding="utf-8")) if layout.config.exists() else {}
        active = raw.get("active_preset")
        for name in raw.get("presets") or {}:
            print(f"{'*' if name == active else ' '} {name}")
        if not raw.get("presets"):
            print("no presets in config.json")
        return EXIT_OK
    return _submit(layout, "preset_switch", name=args.name)


def cmd_monitor(layout: Layout, args: argparse.Namespace) -> int:
    from monitor.__main__ import main as monitor_main
    argv = ["--home", str(layout.home)]
    if args.host:
        argv += ["--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    return monitor_main(argv)


# ---- health and logs ---------------------------------------------------------------------------
def cmd_check(layout: Layout, args: argparse.Namespace) -> int:
    from ops.health import render, run_checks
    findings = run_checks(layout)
    if args.json:
        print(json.dumps([f.to_json() for f in findings], indent=2))
    else:
        print(render(findings))
    return EXIT_FAIL if any(f.level == "problem" for f in findings) else EXIT_OK


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


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer-ctl", description="control the continuous fine-tuning daemon")
    p.add_argument("--home", help="base dir (default: $TRAINER_HOME or the repo root)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="what runs, step, loss, queue counts (exit 3 if the daemon is down)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    for name, text in (("pause", "pause at the next step boundary"), ("resume", "resume training"),
                       ("skip", "end the current job into queue/failed/ (reason: skipped)"),
                       ("stop", "stop the daemon gracefully; the current job resumes at next start")):
        sub.add_parser(name, help=text).set_defaults(func=cmd_training)

    q = sub.add_parser("queue", help="add, list, remove, retry, prioritize datasets")
    qs = q.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    a = qs.add_parser("add", help="copy FILE into the queue")
    a.add_argument("file")
    a.add_argument("--priority", choices=[x.value for x in Priority], default="normal")
    a.add_argument("--force", action="store_true", help="train even if the same content was trained")
    a.set_defaults(func=cmd_queue_add)
    ls = qs.add_parser("list", help="every job with its state")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--state", choices=[x.value for x in JobState])
    ls.set_defaults(func=cmd_queue_list)
    sh = qs.add_parser("show", help="one job: its fields, its data report, its intake validation")
    sh.add_argument("name", help="queue name (or job id)")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_queue_show)
    r = qs.add_parser("remove", help="take a pending job out of the queue (kept in failed/)")
    r.add_argument("name")
    r.set_defaults(func=cmd_queue_remove)
    t = qs.add_parser("retry", help="move a failed job back to pending")
    t.add_argument("name")
    t.add_argument("--force", action="store_true", help="retry even if the content was already trained")
    t.set_defaults(func=cmd_queue_retry)
    pr = qs.add_parser("prioritize", help="set a pending job's priority")
    pr.add_argument("name")
    pr.add_argument("level", choices=[x.value for x in Priority])
    pr.set_defaults(func=cmd_queue_prioritize)

    c = sub.add_parser("config", help="show config, unlock a locked key")
    cs = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    u = cs.add_parser("unlock", help="accept config.json's value for a locked key")
    u.add_argument("key", choices=LOCKED_KEYS)
    u.set_defaults(func=cmd_config_unlock)
    cs.add_parser("show", help="validated config and recorded locked values").set_defaults(func=cmd_config_show)

    ib = sub.add_parser("init-base", help="build the embedded tiny base model")
    ib.add_argument("--tiny", action="store_true", required=True)
    ib.add_argument("--name")
    ib.add_argument("--seed", type=int, default=0)
    ib.add_argument("--set-default", action="store_true", help="make it config.json's base_model")
    ib.set_defaults(func=cmd_init_base)
    g = sub.add_parser("generate", help="write built-in demo data (chat JSONL)")
    g.add_argument("--count", type=int, default=200)
    g.add_argument("--out", help="folder (default: inbox/)")
    g.add_argument("--seed", type=int)
    g.set_defaults(func=cmd_generate)
    sn = sub.add_parser("snapshot", help="copy the live adapter to snapshots/ with a description")
    sn.add_argument("--description", required=True)
    sn.set_defaults(func=cmd_snapshot)
    cn = sub.add_parser("consolidate", help="merge the live adapter into a new base (it becomes base_model)")
    cn.add_argument("--description", required=True)
    cn.add_argument("--pause", action="store_true",
                    help="stop a running job at the next step first (it restarts on the new base)")
    cn.set_defaults(func=cmd_consolidate)
    li = sub.add_parser("lineage", help="the chain of bases and adapters, with datasets")
    li.add_argument("--json", action="store_true")
    li.set_defaults(func=cmd_lineage)
    ps = sub.add_parser("preset", help="list presets, or switch to one (only while no job is mid-way)")
    ps.add_argument("name", nargs="?", help="preset name, or 'none'")
    ps.set_defaults(func=cmd_preset)
    mo = sub.add_parser("monitor", help="serve the dashboard and API (default http://127.0.0.1:8080/; "
                                        "bin/monitor.sh --background to detach)")
    mo.add_argument("--host")
    mo.add_argument("--port", type=int)
    mo.set_defaults(func=cmd_monitor)
    ck = sub.add_parser("check", help="health: config, locked keys, base, queue, disk, checkpoints, GPU")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=cmd_check)
    lg = sub.add_parser("logs", help="tail the daemon and training logs")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--lines", type=int, default=40)
    lg.set_defaults(func=cmd_logs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout.from_env(args.home)
    try:
        return args.func(layout, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:          # `trainer-ctl queue list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:         # a full disk is one clear line, never a traceback
        if not is_disk_full(exc):
            raise
        _err(f"{describe_disk(layout.home)}: {getattr(exc, 'strerror', None) or exc}; nothing was changed")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
