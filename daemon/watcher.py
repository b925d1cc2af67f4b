"""Watches inbox/ and control/ with watchdog, and decides when an inbox file is complete.

Events are hints (inotify drops events past its queue limit and watchdog does not replay
them): the daemon also rescans inbox/ at start-up and periodically. A file renamed into the
inbox is complete at once; a file written in place is complete once its size and mtime have
not changed for ``stable_seconds``.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileMovedEvent, FileSystemEvent, FileSystemEventHandler

try:
    from watchdog.observers.inotify import InotifyObserver as _Observer

    def _make_observer():  # full events: a rename-in arrives as a move, not a create
        return _Observer(generate_full_events=True)
except ImportError:  # not Linux
    from watchdog.observers import Observer as _Observer

    def _make_observer():
        return _Observer()

from daemon.fsqueue import is_candidate, is_ignored

log = logging.getLogger("trainerd.watcher")
# watchdog logs this when its observer is stopped during shutdown: noise, not a fault
logging.getLogger("watchdog.observers.inotify").addFilter(
    lambda r: "thread is inactive" not in r.getMessage())


F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


def open_for_writing(path: Path) -> bool:
    """True if some process has *path* open for writing (Linux: a read lease is refused then).

    Size-stable alone is not enough: a writer that pauses longer than the interval would keep
    writing into the file after it was queued. Where leases are unsupported this says False and
    the stability interval decides.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False          # a symlink, a vanished file, no permission: accept() reports it
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        return False
    except OSError as exc:
        return exc.errno == errno.EAGAIN
    finally:
        os.close(fd)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    changed_at: float
    complete: bool = False      # renamed in: no stability wait


@dataclass
class InboxTracker:
    """Candidates in inbox/ and their stability; thread-safe notes from the watcher thread."""
    inbox: Path
    stable_seconds: float
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _notes: dict[str, bool] = field(default_factory=dict)   # name -> renamed in
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ignored_logged: set[str] = field(default_factory=set)

    def note(self, name: str, *, renamed_in: bool = False) -> None:
        with self._lock:
            self._notes[name] = self._notes.get(name, False) or renamed_in

    def scan(self) -> None:
        try:
            names = os.listdir(self.inbox)
        except FileNotFoundError:
            return
        for name in names:
            self.note(name)

    def ready(self, now: float | None = None) -> list[str]:
        """Names complete enough to take, oldest first. Forgets names that vanished."""
        now = time.monotonic() if now is None else now
        with self._lock:
            notes, self._notes = self._notes, {}
        for name, renamed in notes.items():
            if is_candidate(name):
                entry = self._seen.setdefault(name, _Seen(-1, -1, now))
                entry.complete = entry.complete or renamed
            elif not is_ignored(name) and name not in self._ignored_logged:
                self._ignored_logged.add(name)
                log.info("inbox: ignoring %s (only *.jsonl files are queued)", name)
        out: list[tuple[float, str]] = []
        for name, entry in list(self._seen.items()):
            try:
                st = os.lstat(self.inbox / name)
            except FileNotFoundError:
                del self._seen[name]
                continue
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                first_look = entry.size == -1
                entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                if not first_look:
                    entry.changed_at = now
                    entry.complete = False  # written after the rename: wait for it to settle
                elif not entry.complete:
                    entry.changed_at = now
            if entry.complete or now - entry.changed_at >= self.stable_seconds:
                if open_for_writing(self.inbox / name):      # still being written: wait for close
                    entry.changed_at, entry.complete = now, False
                    continue
                out.append((entry.changed_at, name))
        return [name for _, name in sorted(out)]

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)

    def waiting(self) -> int:
        return len(self._seen)


class _Handler(FileSystemEventHandler):
    def __init__(self, tracker: InboxTracker, inbox: Path, wake: threading.Event) -> None:
        self.tracker, self.inbox, self.wake = tracker, inbox, wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory and event.event_type == "modified":
            return
        if isinstance(event, FileMovedEvent) or event.event_type == "moved":
            dest = Path(os.fsdecode(event.dest_path))
            if dest.parent == self.inbox:
                self.tracker.note(dest.name, renamed_in=True)
        else:
            path = Path(os.fsdecode(event.src_path))
            if path.parent == self.inbox:
                self.tracker.note(path.name)
        self.wake.set()


class _WakeHandler(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.wake.set()


class Watcher:
    """Runs the watchdog observer; sets ``wake`` whenever inbox/ or control/ changes."""

    def __init__(self, tracker: InboxTracker, control_dir: Path, wake: threading.Event) -> None:
        self.observer = _make_observer()
        self.observer.schedule(_Handler(tracker, tracker.inbox, wake), str(tracker.inbox), recursive=False)
        self.observer.schedule(_WakeHandler(wake), str(control_dir), recursive=False)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)
