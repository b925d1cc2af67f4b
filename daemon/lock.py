"""Single instance: an flock on .daemon.lock is the truth; .daemon.pid only says who holds it."""
from __future__ import annotations

import errno
import fcntl
import os
import time

from daemon.atomic import atomic_write
from daemon.paths import Layout


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
        fd = os.open(self.layout.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
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

    def release(self) -> None:
        if self.fd is not None:
            self.layout.pid_file.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def daemon_running(layout: Layout) -> int | None:
    """The daemon's pid if one holds the lock, else None. Probes with a shared lock."""
    try:
        fd = os.open(layout.lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_pid(layout) or -1
    finally:
        os.close(fd)   # closing drops the probe's shared lock
    return None
