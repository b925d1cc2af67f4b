"""Watches inbox/ and control/ with watchdog, and decides when an inbox file is complete.

Events are hints (inotify drops events past its queue limit and watchdog does not replay
them): the daemon also rescans inbox/ at start-up and periodically. A file renamed into the
inbox is complete at once; a file written in place is complete once its size and mtime have
not changed for ``stable_seconds``. Either way a file some process still has open for writing
waits until it is closed.

First in, first out across restarts: the first ``scan()`` of a tracker is the start-up scan.
The files it finds arrived while the daemon was down, so they are taken in their arrival order
(mtime, then name), and nothing noticed later is taken before all of them (a barrier): a file
renamed in just after the start waits for them although it is complete at once.

- A start-up file whose mtime is at least ``stable_seconds`` old and that no process has open for
  writing is complete: its mtime already proves it has not changed for the stability interval,
  so it is taken at once, without a second wait. A younger one waits until its mtime is that old
  (the barrier holds meanwhile, so a later arrival cannot overtake it).
- A start-up file that is still open for writing, or that changes after the scan, is still being
  written: it has not arrived yet. It leaves the barrier and is taken like any file written in
  place (once closed and stable), in the order of its completion, exactly as it would have been
  with the daemon running. So a writer that never closes its file cannot block the inbox.
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

from daemon.intakefile import is_candidate, is_ignored

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
    startup: bool = False       # found by the start-up scan and still behind its barrier


@dataclass
class InboxTracker:
    """Candidates in inbox/ and their stability; thread-safe notes from the watcher thread."""
    inbox: Path
    stable_seconds: float
    _seen: dict[str, _Seen] = field(default_factory=dict)
    _notes: dict[str, bool] = field(default_factory=dict)   # name -> renamed in
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ignored_logged: set[str] = field(default_factory=set)
    _scanned: bool = False
    # the start-up barrier: name -> (mtime_ns, name) of the files found by the first scan that
    # are not taken yet (a name stays while the daemon takes it again after FileChanged)
    _startup: dict[str, tuple[int, str]] = field(default_factory=dict)

    def note(self, name: str, *, renamed_in: bool = False) -> None:
        with self._lock:
            self._notes[name] = self._notes.get(name, False) or renamed_in

    def scan(self) -> None:
        """Note every name in inbox/. The first call is the start-up scan (see the module doc)."""
        try:
            names = os.listdir(self.inbox)
        except FileNotFoundError:
            return
        startup, self._scanned = not self._scanned, True
        for name in names:
            if startup and is_candidate(name):
                try:
                    st = os.lstat(self.inbox / name)
                except FileNotFoundError:
                    continue
                self._startup[name] = (st.st_mtime_ns, name)
            self.note(name)

    def _release(self, name: str, entry: _Seen, why: str) -> None:
        """A start-up file still being written: it arrives when complete, like a live one."""
        if self._startup.pop(name, None) is not None:
            log.info("inbox: %s is still being written (%s); taken once complete", name, why)
        entry.startup = False

    def ready(self, now: float | None = None) -> list[str]:
        """Names complete enough to take, oldest first. Forgets names that vanished.

        While start-up files are waiting only they are returned: the longest run of them, in
        (mtime, name) order, that is complete (none is skipped)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            notes, self._notes = self._notes, {}
        for name, renamed in notes.items():
            if is_candidate(name):
                entry = self._seen.get(name)
                if entry is None:
                    entry = self._seen[name] = _Seen(-1, -1, now, startup=name in self._startup)
                entry.complete = entry.complete or renamed
            elif not is_ignored(name) and name not in self._ignored_logged:
                self._ignored_logged.add(name)
                log.info("inbox: ignoring %s (only *.jsonl files are queued)", name)
        for name in [n for n in self._startup if n not in self._seen]:
            del self._startup[name]          # taken (forgotten) and not noted again
        out: list[tuple[float, str]] = []
        startup_ready: set[str] = set()
        wall_ns = time.time_ns()
        for name, entry in list(self._seen.items()):
            try:
                st = os.lstat(self.inbox / name)
            except FileNotFoundError:
                del self._seen[name]
                self._startup.pop(name, None)
                continue
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                first_look = entry.size == -1
                entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
                if not first_look:
                    entry.changed_at = now
                    entry.complete = False  # written after the rename: wait for it to settle
                    if entry.startup:
                        self._release(name, entry, "it changed after the start-up scan")
                elif not entry.complete:
                    entry.changed_at = now
            if entry.startup:
                # its mtime proves how long it has been unchanged (the usual wait covers an
                # mtime in the future)
                settled = (wall_ns - st.st_mtime_ns >= self.stable_seconds * 1e9
                           or now - entry.changed_at >= self.stable_seconds)
                if not settled:
                    continue
                if open_for_writing(self.inbox / name):
                    entry.changed_at, entry.complete = now, False
                    self._release(name, entry, "open for writing")
                    continue
                startup_ready.add(name)
                continue
            if entry.complete or now - entry.changed_at >= self.stable_seconds:
                if open_for_writing(self.inbox / name):      # still being written: wait for close
                    entry.changed_at, entry.complete = now, False
                    continue
                out.append((entry.changed_at, name))
        if self._startup:            # the barrier: start-up files first, in arrival order
            first: list[str] = []
            for name in sorted(self._startup, key=self._startup.__getitem__):
                if name not in startup_ready:
                    break
                first.append(name)
            return first
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
