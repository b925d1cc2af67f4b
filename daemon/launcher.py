"""Start trainerd in the background, exactly once per base dir.

The launcher takes the flock itself, then starts the daemon with the locked descriptor
inherited, so there is no window where two launchers both believe they won. The others exit 1
with ``already running (pid N)``. A stale .daemon.pid (dead process) never blocks: only the
lock counts.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from core.atomic import atomic_write
from core.diskfull import MIB, describe as describe_disk, free_bytes, is_disk_full
from core.lock import AlreadyRunning, DaemonLock, pid_alive, read_pid
from core.logsetup import tail_lines
from core.paths import REPO_ROOT, Layout
from daemon.status import read_status


def _tail(path, n: int = 20) -> str:
    return "\n".join(tail_lines(path, n))


def _acquire_or_report(layout: Layout, max_wait_s: float = 600.0) -> DaemonLock | None:
    """Take the lock, or say who has it. A live pid in .daemon.pid means a daemon holds it; no
    live pid after a moment means a short trainer-ctl operation does, and we wait for it."""
    t0 = time.monotonic()
    announced = False
    while True:
        try:
            return DaemonLock(layout).acquire(wait_s=0.5)
        except AlreadyRunning:
            pid = read_pid(layout)
        if pid_alive(pid):
            print(f"trainerd: already running (pid {pid})", file=sys.stderr)
            return None
        waited = time.monotonic() - t0
        if waited > max_wait_s:
            print(f"trainerd: the base dir has been locked by another process for {max_wait_s:.0f} s; "
                  "not starting", file=sys.stderr)
            return None
        if waited > 3.0 and not announced:
            announced = True
            print("trainerd: waiting for a trainer-ctl operation on this base dir to finish", file=sys.stderr)


def launch(layout: Layout, *, wait_s: float = 60.0) -> int:
    layout.ensure()
    lock = _acquire_or_report(layout)
    if lock is None:
        return 1
    out_log = layout.logs / "daemon_stdout.log"
    with open(out_log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--home", str(layout.home), "--lock-fd", str(lock.fd), "--quiet"],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            pass_fds=(lock.fd,), start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    atomic_write(layout.pid_file, f"{proc.pid}\n")
    os.close(lock.fd)          # the daemon holds the same open file, and with it the lock
    lock.fd = None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            hint = f"\n{describe_disk(layout.home)}" if free_bytes(layout.home) < 16 * MIB else ""
            print(f"trainerd: failed to start (exit {rc}). Last output:\n{_tail(out_log)}{hint}", file=sys.stderr)
            return 2
        status = read_status(layout)
        if status and status.get("daemon_pid") == proc.pid and status.get("status") != "stopped":
            break
        time.sleep(0.1)
    else:
        print(f"trainerd: started (pid {proc.pid}) but has not reported status after {wait_s:.0f} s; "
              f"see {out_log}", file=sys.stderr)
        return 0
    day = time.strftime("%Y%m%d")
    print(f"trainerd started (pid {proc.pid}) in {layout.home}\n"
          f"  log:    {layout.logs / f'daemon_{day}.log'}\n"
          f"  status: trainer-ctl status   (or {layout.status_file})\n"
          f"  stop:   trainer-ctl stop     (emergency: touch {layout.stop_flag})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch_training_daemon", description="start trainerd once, in the background")
    p.add_argument("--home", help="base dir (default: $TRAINER_HOME or the repo root)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the daemon to report")
    args = p.parse_args(argv)
    layout = Layout.from_env(args.home)
    try:
        return launch(layout, wait_s=args.wait)
    except Exception as exc:      # a full disk is one clear line, never a traceback
        if not is_disk_full(exc):
            raise
        print(f"trainerd: cannot start: {describe_disk(layout.home)}: "
              f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
