"""PR_SET_PDEATHSIG: a child process dies with the thread that started it (Linux; a no-op elsewhere).

Used as ``preexec_fn`` for the trainer worker and the intake check, so a SIGKILLed daemon leaves
no process behind. Note the kernel ties the signal to the *thread* that forked the child: the
starting thread must outlive the child (it waits for it)."""
from __future__ import annotations

import ctypes
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved once at import: preexec_fn runs between fork and exec, where loading a library
# (dlopen takes locks another thread may have held at fork time) is best avoided.
_PRCTL = _load_prctl()


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send *sig* to this process when its parent (thread) dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
