"""trainer-ctl commands on models and data: init-base, generate, snapshot, lineage, consolidate."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core import evaltable
from core.atomic import atomic_write_json, durable_rename, fsync_dir
from core.diskfull import is_disk_full
from core.lock import daemon_running
from core.paths import Layout
from daemon.status import read_status
from ops.ctl_common import EXIT_FAIL, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, err, open_db, raw_config, send


def cmd_init_base(layout: Layout, args: argparse.Namespace) -> int:
    if not args.tiny:
        err("only --tiny is supported: point config.json's base_model at your own local model folder")
        return EXIT_USAGE
    from trainer.tiny_base import build_tiny_base
    name = args.name or time.strftime("%Y%m%d_%H%M%S") + "_tiny"
    if "/" in name or name.startswith("."):
        err(f"bad name {name!r}")
        return EXIT_USAGE
    out = layout.consolidated / name
    if out.exists():
        err(f"{out} already exists")
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


def cmd_snapshot(layout: Layout, args: argparse.Namespace) -> int:
    from ops.snapshot import ConsolidationError, snapshot_now
    try:
        path = snapshot_now(layout.home, args.description)
    except ConsolidationError as exc:
        if is_disk_full(exc):       # the one-line disk-full answer of main()
            raise
        err(str(exc))
        return EXIT_FAIL
    print(f"snapshot written: {path}")
    return EXIT_OK


def cmd_lineage(layout: Layout, args: argparse.Namespace) -> int:
    from ops.lineage import lineage
    chain = lineage(layout.home, raw_config(layout))
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
        for mv in node.get("moves") or []:
            verb = "promoted" if mv.get("action") == "promote" else "rolled back to"
            print(f"{'  ' * i}     ↳ {mv.get('ts')}: {verb} {mv.get('snapshot')} "
                  f"(previous adapter kept as {mv.get('previous') or 'none'})")
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
        err(f"refused: {what}. Rerun with --pause to stop at the next step, consolidate, and restart "
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
            err("the daemon did not stop within 10 minutes; consolidation not started")
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
        result = consolidate(layout.home, raw_config(layout), args.description)
        print(f"consolidated into {result['new_base_path']}\n"
              f"  parent:    {result['parent_base']}\n"
              f"  datasets:  {len(result['datasets'])}\n"
              f"  probe:     max |merged - (base+adapter)| = {result['probe_max_abs_diff']:.2e} "
              f"(tolerance {result['probe_tolerance']:.0e})\n"
              f"  backup:    {result['backup']}\n"
              f"config.json base_model is now {result['new_base']}; the next job starts a fresh adapter")
    except ConsolidationError as exc:
        err(f"consolidation refused: {exc}")
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


def cmd_eval(layout: Layout, args: argparse.Namespace) -> int:
    """The forgetting matrix (core/evaltable.py): rows datasets, columns the adapter after each job."""
    db = open_db(layout)
    try:
        rows = evaltable.read_rows(db) if db is not None else []
    finally:
        if db is not None:
            db.close()
    m = evaltable.matrix(rows)
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print("\n".join(evaltable.render(m)))
    return EXIT_OK
