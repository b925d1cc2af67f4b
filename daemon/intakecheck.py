"""The slow part of taking an inbox file in (sha256 + validation), off the daemon's main loop.

An :class:`IntakeCheck` runs :func:`daemon.intakefile.check_file` in a child process
(``python -m daemon.intakecheck``), watched by a thread that hands the result to the loop through
a Future. A process, not a thread: validation is pure Python and would hold the GIL, and every
control request or status write of the loop would then wait for it (measured: replies over 1 s
on 2 cores). The child only reads; it dies with the daemon (PR_SET_PDEATHSIG), and a stop kills it.

Protocol: argv carries the path, the name and the bad-record threshold; the child writes one
pickled ``("ok", Checked)`` or ``("error", exception)`` to stdout.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from core.pdeathsig import set_pdeathsig
from core.validation import ValidationCancelled
from daemon.intakefile import Checked, check_file
from daemon.status import iso

REPO_ROOT = Path(__file__).resolve().parent.parent     # where ``-m daemon.intakecheck`` imports from


class IntakeCheck:
    """One inbox file being hashed and validated in a child process, so that the loop goes on
    answering control requests and writing status meanwhile; the loop then takes the file in
    with the result (``FsQueue.accept(..., checked=)``)."""

    def __init__(self, name: str, path: Path, size: int, max_bad_record_fraction: float,
                 wake: threading.Event) -> None:
        self.name, self.path, self.size = name, path, size
        self.started_at = iso()
        self.future: "Future[Checked]" = Future()
        self._cancel = threading.Event()
        self._fraction, self._wake = max_bad_record_fraction, wake
        self._proc: subprocess.Popen[bytes] | None = None
        # a daemon thread: a check never holds up the daemon's exit (it only reads). The thread
        # starts the child and waits for it: PR_SET_PDEATHSIG is tied to the thread that forked.
        self.thread = threading.Thread(target=self._run, name=f"check-{name}"[:60], daemon=True)

    def start(self) -> "IntakeCheck":
        self.thread.start()
        return self

    def _run(self) -> None:
        self.future.set_running_or_notify_cancel()
        try:
            self.future.set_result(self._check())
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which decides
            self.future.set_exception(exc)
        finally:
            self._wake.set()

    def _check(self) -> Checked:
        cmd = [sys.executable, "-m", "daemon.intakecheck", str(self.path), self.name, repr(self._fraction)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=str(REPO_ROOT), preexec_fn=set_pdeathsig, close_fds=True)
        self._proc = proc
        if self._cancel.is_set():       # cancelled while starting
            proc.kill()
        out, err = proc.communicate()
        if self._cancel.is_set():
            raise ValidationCancelled(f"{self.name}: check stopped")
        try:
            kind, value = pickle.loads(out)
        except Exception:   # noqa: BLE001 - the child died (killed, out of memory) before answering
            tail = err.decode("utf-8", "replace").strip()[-2000:]
            raise RuntimeError(f"the check of {self.name} ended without an answer (exit {proc.returncode})"
                               + (f": {tail}" if tail else "")) from None
        if kind == "error":
            raise value
        return value

    def cancel(self, timeout: float = 5.0) -> None:
        """Stop reading (the file stays where it is) and wait a little for the thread to end."""
        self._cancel.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self.thread.join(timeout)

    def status(self) -> dict[str, Any]:
        return {"file": self.name, "bytes": self.size, "since": self.started_at}


def _child(argv: list[str]) -> int:
    path, name, fraction = Path(argv[0]), argv[1], float(argv[2])
    try:
        answer: tuple[str, Any] = ("ok", check_file(path, max_bad_record_fraction=fraction, name=name))
    except Exception as exc:    # noqa: BLE001 - the parent raises it where the loop expects it
        answer = ("error", exc)
    try:
        data = pickle.dumps(answer)
        pickle.loads(data)      # an exception that does not survive the trip is sent as text
    except Exception:   # noqa: BLE001
        data = pickle.dumps(("error", RuntimeError(repr(answer[1]))))
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
