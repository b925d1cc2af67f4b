"""trainer-ctl check: is this base dir healthy? Each check gives ok / warning / problem."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.atomic import read_json
from core.config import ConfigError, describe_locked_diffs, load_config, locked_diffs
from core.lock import daemon_running
from core.paths import Layout
from core.statedb import StateDB
from core.states import FOLDER_STATES
from daemon.fsqueue import FsQueue

GIB = 1 << 30
MIB = 1 << 20


@dataclass
class Finding:
    check: str
    level: str       # ok | warning | problem
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gpu_visibility() -> Finding:
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            n = pynvml.nvmlDeviceGetCount()
            names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(n)]
        finally:
            pynvml.nvmlShutdown()
        return Finding("gpu", "ok", f"{n} NVIDIA GPU(s): {', '.join(map(str, names))}")
    except Exception as exc:
        return Finding("gpu", "ok", f"no NVIDIA GPU detected ({type(exc).__name__}); training runs on the CPU")


def run_checks(layout: Layout) -> list[Finding]:
    out: list[Finding] = []
    pid = daemon_running(layout)
    out.append(Finding("daemon", "ok", f"running (pid {pid})" if pid else "not running"))
    try:
        cfg = load_config(layout.config)
        out.append(Finding("config", "ok", f"{layout.config} is valid"))
    except ConfigError as exc:
        out.append(Finding("config", "problem", str(exc)))
        cfg = None

    db = StateDB(layout.state_db, readonly=True) if layout.state_db.exists() else None
    try:
        if cfg is not None and db is not None:
            recorded = db.locked(cfg.locked_namespace)
            diffs = locked_diffs(recorded, cfg)
            out.append(Finding("locked keys", "problem" if diffs else "ok",
                               describe_locked_diffs(diffs) + " (refused; `trainer-ctl config unlock KEY` to accept)"
                               if diffs else f"{len(recorded)} recorded, config.json agrees"))
        if cfg is not None:
            out.append(_check_base(layout, cfg))
        if db is not None and all(layout.state_dir(s).is_dir() for s in FOLDER_STATES):
            fixes = FsQueue(layout, db).reconcile(dry_run=True)
            stuck = [f for f in fixes if "interrupted in processing/" in f]
            other = [f for f in fixes if f not in stuck]
            out.append(Finding("queue vs state.db", "problem" if other else "ok",
                               "; ".join(other) if other else "consistent"))
            if stuck and not pid:
                out.append(Finding("stuck files", "problem",
                                   f"{len(stuck)} file(s) in queue/processing/ with no daemon running: "
                                   + ", ".join(f.split(':')[0] for f in stuck)
                                   + " (they resume at the next start: bin/launch_training_daemon.sh)"))
            else:
                out.append(Finding("stuck files", "ok", "none"))
    finally:
        if db is not None:
            db.close()

    stale = [p.name for p in layout.inbox.glob(".*.part")
             if p.is_file() and time.time() - p.stat().st_mtime > 3600] if layout.inbox.is_dir() else []
    out.append(Finding("staged uploads", "warning" if stale else "ok",
                       f"{len(stale)} staged copy(ies) in inbox/ older than an hour, never queued: "
                       f"{', '.join(stale[:5])} (rename one to NAME.jsonl to queue it)" if stale else "none"))
    free = shutil.disk_usage(layout.home).free
    out.append(Finding("disk", "problem" if free < GIB else "warning" if free < 5 * GIB else "ok",
                       f"{free / GIB:.1f} GiB free in {layout.home}"))
    out.append(_check_checkpoints(layout))
    out.append(_check_sizes(layout, cfg))
    out.append(gpu_visibility())
    return out


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _check_sizes(layout: Layout, cfg: Any) -> Finding:
    """What grows with use, against its retention setting (daemon/retention.py, daemon/status.py)."""
    from core.config import Config
    from daemon.status import metrics_files

    def setting(key: str) -> Any:
        return getattr(cfg, key) if cfg is not None else Config.model_fields[key].default

    parts: list[str] = []
    level = "ok"
    snaps = [d for d in layout.snapshots.iterdir() if d.is_dir() and not d.name.startswith(".")] \
        if layout.snapshots.is_dir() else []
    parts.append(f"snapshots/ {len(snaps)} ({_mib(sum(_tree_size(d) for d in snaps))}; "
                 f"keep_snapshots {setting('keep_snapshots')} + consolidation/manual ones)")
    ck = layout.checkpoints
    live = [d for d in ck.glob("job-*") if d.is_dir()] if ck.is_dir() else []
    aside = [d for d in (ck / "set-aside").glob("job-*") if d.is_dir()] if ck.is_dir() else []
    parts.append(f"checkpoints/ {len(live)} job(s) {_mib(sum(_tree_size(d) for d in live))}, "
                 f"set aside (failed/skipped, kept for a retry) {len(aside)} job(s) "
                 f"{_mib(sum(_tree_size(d) for d in aside))} (keep_set_aside {setting('keep_set_aside')})")
    mfiles = metrics_files(layout.metrics_file)
    msize = sum(_tree_size(f) for f in mfiles)
    cap = setting("metrics_max_mb") * (setting("metrics_keep_files") + 1) * MIB
    parts.append(f"metrics.jsonl {len(mfiles)} file(s) {_mib(msize)} (at most ~{_mib(int(cap))}: "
                 f"metrics_max_mb {setting('metrics_max_mb')} x {setting('metrics_keep_files')} + 1)")
    if msize > cap * 1.5:
        level = "warning"
    db_files = [p for p in (layout.state_db, layout.state_db.with_name(layout.state_db.name + "-wal"))
                if p.exists()]
    parts.append(f"state.db {_mib(sum(p.stat().st_size for p in db_files))} "
                 f"(events keep_events {setting('keep_events')})")
    if layout.logs.is_dir():
        parts.append(f"logs/ {_mib(_tree_size(layout.logs))}")
    return Finding("sizes", level, "; ".join(parts))


def _check_base(layout: Layout, cfg: Any) -> Finding:
    base = cfg.base_model_path(layout.home)
    if base is None:
        return Finding("base model", "problem" if cfg.trainer == "qlora" else "ok",
                       "config.json has no base_model (bin/start_all.sh builds the tiny one)")
    if not (base / "config.json").is_file():
        return Finding("base model", "problem", f"{base} is not a model folder (no config.json)")
    from trainer.model import FINGERPRINT_CACHE_NAME, base_fingerprint
    fp = base_fingerprint(base, layout.checkpoints / FINGERPRINT_CACHE_NAME)
    state = read_json(layout.current_model / "trainer_state.json", {}) or {}
    recorded = state.get("base_fingerprint")
    if recorded and recorded != fp:
        return Finding("base model", "problem",
                       f"current_model/ was trained on {state.get('base_model')} (fingerprint {recorded[:16]}) "
                       f"but base_model is {base} (fingerprint {fp[:16]})")
    return Finding("base model", "ok", f"{base} (fingerprint {fp[:16]})")


def _check_checkpoints(layout: Layout) -> Finding:
    dirs = sorted(p for p in layout.checkpoints.glob("job-*/step-*") if p.is_dir())
    if not dirs:
        return Finding("checkpoints", "ok", "none")
    from trainer.checkpoint import CheckpointError, verify_manifest
    bad = []
    for d in dirs:
        try:
            verify_manifest(d)
        except CheckpointError as exc:
            bad.append(str(exc))
    return Finding("checkpoints", "problem" if bad else "ok",
                   "; ".join(bad) if bad else f"{len(dirs)} checkpoint(s) verified")


def render(findings: list[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    mark = {"ok": "ok", "warning": "WARN", "problem": "FAIL"}
    return "\n".join(f"{mark[f.level]:<5} {f.check:<{width}}  {f.detail}" for f in findings)
