"""Auto-generate data when the queue runs dry: the built-in generator, an HTTP endpoint or a
command that prints JSONL. What comes back lands in inbox/ atomically (hidden temp name, then
rename) and is validated like any other file. A failing source is logged and retried with
exponential backoff; it never stops the daemon.
"""
from __future__ import annotations

import logging
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from core.atomic import atomic_write
from core.config import AutoGenerateConfig

log = logging.getLogger("trainerd.autogen")

MAX_BYTES = 512 * 1024 * 1024
TIMEOUT_S = 60.0
MAX_BACKOFF_S = 600.0


class AutoGenerator:
    def __init__(self, inbox: Path) -> None:
        self.inbox = inbox
        self.failures = 0
        self.next_at = 0.0
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def take_error(self) -> str | None:
        """The last failure, once (the daemon loop logs and shows it)."""
        err, self.last_error = self.last_error, None
        return err

    def maybe_start(self, cfg: AutoGenerateConfig, idle: bool) -> bool:
        """Start one generation in the background if enabled, idle, and not backing off."""
        if not cfg.enabled or not idle or self.busy() or time.monotonic() < self.next_at:
            return False
        self._thread = threading.Thread(target=self._work, args=(cfg,), name="autogen", daemon=True)
        self._thread.start()
        return True

    def _work(self, cfg: AutoGenerateConfig) -> None:
        try:
            path = self.produce(cfg)
        except Exception as exc:
            self.failures += 1
            delay = min(MAX_BACKOFF_S, 5.0 * 2 ** (self.failures - 1))
            self.last_error = f"auto-generate ({cfg.source}) failed: {exc}; retrying in {delay:.0f} s"
            self.next_at = time.monotonic() + delay
            return
        self.failures = 0
        self.next_at = time.monotonic() + cfg.min_interval_s
        log.info("auto-generate (%s): wrote %s", cfg.source, path.name)

    def produce(self, cfg: AutoGenerateConfig) -> Path:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        if cfg.source == "builtin":
            from daemon.generator import generate_records, write_jsonl_atomic
            return write_jsonl_atomic(generate_records(cfg.count), self.inbox)
        if cfg.source == "http":
            if not cfg.url:
                raise ValueError("auto_generate.url is not set")
            with urllib.request.urlopen(cfg.url, timeout=TIMEOUT_S) as resp:
                data = resp.read(MAX_BYTES + 1)
        else:
            if not cfg.command:
                raise ValueError("auto_generate.command is not set")
            proc = subprocess.run(cfg.command, capture_output=True, timeout=TIMEOUT_S * 5)
            if proc.returncode != 0:
                raise RuntimeError(f"command exited {proc.returncode}: "
                                   f"{proc.stderr.decode(errors='replace')[-300:].strip()}")
            data = proc.stdout
        if len(data) > MAX_BYTES:
            raise ValueError(f"generator returned more than {MAX_BYTES} bytes")
        if not data.strip():
            raise ValueError("generator returned no data")
        path = self.inbox / f"autogen_{cfg.source}_{stamp}_{time.time_ns() % 10**6:06d}.jsonl"
        atomic_write(path, data)
        return path
