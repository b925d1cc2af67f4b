"""Single instance: an flock on the base dir itself is the truth; .daemon.pid says who holds it.

The base directory is locked rather than a lock file: a file can be deleted while locked
(`rm .daemon.lock` to "clear a stale lock"), after which a second daemon could lock a new file;
the directory a daemon runs in cannot be swapped out from under it that way.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time

from core.atomic import atomic_write
from core.paths import Layout


class AlreadyRunning(RuntimeError):
    def __init__(self, pid: int | None) -> None:
        super().__init__(f"already running (pid {pid if pid is not None else 'unknown'})")
        self.pid = pid


def read_pid(layout: Layout) -> int | None:
    try:
        return int(layout.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DaemonLock:
    """Holds LOCK_EX on the lock file for as long as this object (or an inheriting child) lives."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.fd: int | None = None

    def acquire(self, wait_s: float = 1.0) -> "DaemonLock":
        self.layout.home.mkdir(parents=True, exist_ok=True)
        fd = _open_home(self.layout)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:   # a brief probe may hold it: wait a moment
                    os.close(fd)
                    raise AlreadyRunning(read_pid(self.layout)) from None
                time.sleep(0.05)
        self.fd = fd
        return self

    @classmethod
    def adopt(cls, layout: Layout, fd: int) -> "DaemonLock":
        """Take over a lock fd inherited from the launcher (already locked by it)."""
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # same open file: succeeds, proves it
        lock = cls(layout)
        lock.fd = fd
        return lock

    def write_pid(self, pid: int | None = None) -> None:
        atomic_write(self.layout.pid_file, f"{pid or os.getpid()}\n")

    def release(self, *, remove_pid: bool = False) -> None:
        if self.fd is not None:
            if remove_pid:
                self.layout.pid_file.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _open_home(layout: Layout) -> int:
    return os.open(layout.home, os.O_RDONLY | os.O_DIRECTORY)


def daemon_running(layout: Layout) -> int | None:
    """The daemon's pid if one holds the lock, else None. Probes with a shared lock.

    A holder whose pid is not alive is a trainer-ctl (or consolidation) doing a short job
    under the lock, not a daemon: that counts as not running.
    """
    try:
        fd = _open_home(layout)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pid = read_pid(layout)
        return pid if pid_alive(pid) else None
    finally:
        os.close(fd)   # closing drops the probe's shared lock
    return None
