"""The build of a token cache entry (trainer/tokencache.py): the file's lines tokenized in their
visiting order, in a background thread, while the trainer reads the positions done so far.

A build writes ``.partial-NAME/`` block by block (``BLOCK`` positions): the data of a block is
fsynced before ``progress.json`` names it, so a build killed at any point resumes from its last
block (a resume or retry of a huge file does not start over), and the folder is renamed to NAME
once complete: an entry either is complete or is not there.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.atomic import atomic_write_json, fsync_dir
from trainer.data import DataReport
from trainer.tokencache import ARRAYS, _read_json, line_order

log = logging.getLogger("trainer.tokencache")     # a part of the cache: its lines keep the cache's name

BLOCK = 1024                       # positions per durable block (one batch of the encoder)


def line_index(path: Path) -> np.ndarray:
    """Byte offset of every line's start, then the file size (lines + 1 entries)."""
    parts, pos = [np.zeros(1, np.int64)], 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            parts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(block)
    idx = np.concatenate(parts)
    return idx if idx[-1] == pos else np.append(idx, pos)


class Build:
    """Builds (or finishes) one entry in a background thread; readers wait for positions."""

    def __init__(self, path: Path, tokenizer: Any, *, dest: Path, key: dict[str, Any], max_length: int,
                 truncation: str) -> None:
        self.path, self.tokenizer, self.dest, self.key = Path(path), tokenizer, dest, key
        self.max_length, self.truncation = max_length, truncation
        self.part = dest.parent / f".partial-{dest.name}"
        self.cond = threading.Condition()
        self.positions = self.examples = self.tokens = 0
        self.total = 0                      # lines (positions) in the file, once ``indexed``
        self.indexed = False
        self.resumed_from = 0
        self.complete = False
        self.error: BaseException | None = None
        self.report = DataReport(format=None)
        self._report_json: dict[str, Any] = self.report.to_json()   # what readers see (under cond)
        self._encoder_state: dict[str, Any] | None = None
        self._seen = 0                      # digests in seen.u64 (duplicate detection, continued)
        self._stop = False
        self._go = threading.Event()        # cleared by hold(): the build waits between blocks
        self._go.set()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="tokencache", daemon=True)

    @property
    def root(self) -> Path:
        return self.dest if self.complete else self.part

    def start(self) -> "Build":
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current block (what is done stays, for the next attempt)."""
        self._stop = True
        self._go.set()
        self.thread.join()

    def hold(self, held: bool) -> None:
        """Hold the build between blocks (while the model loads: the CPU and the GIL go to it)."""
        (self._go.clear if held else self._go.set)()

    def _open(self) -> None:
        """Continue a partial build of this key, else start an empty one."""
        prog = _read_json(self.part / "progress.json")
        if isinstance(prog, dict) and prog.get("key") == self.key:
            try:
                self._continue(prog)
                return
            except (OSError, ValueError, KeyError) as exc:
                log.warning("token cache: %s cannot be continued (%s); building it again", self.part.name, exc)
        shutil.rmtree(self.part, ignore_errors=True)
        self.part.mkdir(parents=True)
        for fname, _ in ARRAYS.values():
            (self.part / fname).touch()
        (self.part / "seen.u64").touch()
        self.report.truncation, self.report.max_length = self.truncation, self.max_length

    def _continue(self, prog: dict[str, Any]) -> None:
        """Cut the files back to the last block ``progress.json`` names (written after its data)."""
        positions, examples, tokens = int(prog["positions"]), int(prog["examples"]), int(prog["tokens"])
        sizes = {"ids": tokens, "mask": tokens, "ends": examples, "lines": examples, "pos_end": positions}
        for name, n in sizes.items():
            fname, dtype = ARRAYS[name]
            want = n * np.dtype(dtype).itemsize
            if (self.part / fname).stat().st_size < want:
                raise ValueError(f"{fname} is shorter than its progress record")
        for name, n in sizes.items():
            fname, dtype = ARRAYS[name]
            with open(self.part / fname, "r+b") as fh:
                fh.truncate(n * np.dtype(dtype).itemsize)
        seen = int(prog.get("seen") or 0)
        if (self.part / "seen.u64").stat().st_size < seen * 8:
            raise ValueError("seen.u64 is shorter than its progress record")
        with open(self.part / "seen.u64", "r+b") as fh:
            fh.truncate(seen * 8)
        self.report = DataReport.from_json(prog["report"])
        self._report_json = self.report.to_json()
        self._encoder_state, self._seen = prog.get("encoder"), seen
        self.positions, self.examples, self.tokens = positions, examples, tokens
        self.resumed_from = positions
        log.info("token cache: continuing %s at position %d", self.part.name, positions)

    def wait(self, positions: int, on_wait: Callable[[], None] | None = None, every: float = 0.5) -> None:
        """Block until *positions* are built (or everything is); raises the builder's error. A
        reader waiting for data lifts a hold (it needs the build to go on)."""
        self._go.set()
        with self.cond:
            while not self.complete and (not self.indexed or self.positions < min(positions, self.total)):
                if self.error is not None:
                    break
                if not self.thread.is_alive() and self.error is None and not self.complete:
                    raise RuntimeError("the token cache build stopped before it was complete")
                self.cond.wait(every)
                if on_wait is not None:
                    on_wait()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            self._build()
        except BaseException as exc:   # handed to the reader (wait) on the main thread
            log.error("token cache build failed: %r", exc)
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def _build(self) -> None:
        from trainer.encode import Encoder, LineChecker, first_format

        if self.report.format is None:      # the file's format is its first record's, in file order
            self.report.format = first_format(self.path)
        index = line_index(self.path)
        n = len(index) - 1
        with self.cond:
            self.total, self.indexed = n, True
            self.cond.notify_all()
        order = line_order(n, int(self.key.get("seed", 0)))
        checker = LineChecker(self.report)
        if self._seen:
            raw = (self.part / "seen.u64").read_bytes()
            checker.seen = {raw[i:i + 8] for i in range(0, len(raw), 8)}
        encoder: Encoder | None = None
        files = {name: open(self.part / fname, "ab") for name, (fname, _) in ARRAYS.items()}
        files["seen"] = open(self.part / "seen.u64", "ab")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for a in range(self.positions, n, BLOCK):
                self._go.wait()
                if self._stop:
                    return
                lines0 = order[a:a + BLOCK]
                records = []
                for ln in lines0.tolist():
                    raw = os.pread(fd, int(index[ln + 1] - index[ln]), int(index[ln]))
                    rec = checker.check(ln + 1, raw)
                    if rec is not None:
                        records.append((ln + 1, rec))
                if records and encoder is None:
                    encoder = Encoder(self.tokenizer, str(self.report.format), max_length=self.max_length,
                                      truncation=self.truncation, report=self.report)
                    encoder.restore(self._encoder_state)
                out = encoder.encode(records) if records else []
                if encoder is not None:
                    self._encoder_state = encoder.state()
                digests, checker.new = checker.new, []
                self._append(files, lines0, out, digests)
            for fh in files.values():
                fh.close()
            self._finish()
        finally:
            os.close(fd)
            for fh in files.values():
                fh.close()

    def _append(self, files: dict[str, Any], lines0: np.ndarray, out: list[Any], digests: list[bytes]) -> None:
        """Write one block durably, then publish it."""
        per_line: dict[int, int] = {}
        for e in out:
            per_line[e.line] = per_line.get(e.line, 0) + 1
        lens = np.asarray([len(e.ids) for e in out], dtype=np.int64)
        ends = self.tokens + np.cumsum(lens)
        pos_end = self.examples + np.cumsum([per_line.get(int(ln) + 1, 0) for ln in lines0])
        if out:
            files["ids"].write(np.concatenate([e.ids for e in out]).astype(np.int32).tobytes())
            files["mask"].write(np.concatenate([e.mask for e in out]).astype(np.uint8).tobytes())
        files["ends"].write(ends.astype(np.int64).tobytes())
        files["lines"].write(np.asarray([e.line for e in out], dtype=np.int64).tobytes())
        files["pos_end"].write(pos_end.astype(np.int64).tobytes())
        files["seen"].write(b"".join(digests))
        for fh in files.values():
            fh.flush()
            os.fsync(fh.fileno())
        positions, examples, tokens = self.positions + len(lines0), self.examples + len(out), int(self.tokens + lens.sum())
        report = self.report.to_json()
        seen = self._seen + len(digests)
        atomic_write_json(self.part / "progress.json", {
            "key": self.key, "positions": positions, "examples": examples, "tokens": tokens, "report": report,
            "encoder": self._encoder_state, "seen": seen})
        with self.cond:
            self.positions, self.examples, self.tokens = positions, examples, tokens
            self._report_json, self._seen = report, seen
            self.cond.notify_all()

    def report_snapshot(self) -> DataReport:
        """The report as of the last block (the build thread goes on changing its own)."""
        with self.cond:
            return self.report if self.complete else DataReport.from_json(self._report_json)

    def _finish(self) -> None:
        atomic_write_json(self.part / "report.json", self.report.to_json())
        atomic_write_json(self.part / "meta.json", {
            **self.key, "examples": self.examples, "tokens": self.tokens, "positions": self.positions,
            "records": self.report.records, "source": str(self.path),
            "built_s": round(time.monotonic() - self.t0, 2), "continued_from_position": self.resumed_from})
        if self.dest.exists():
            shutil.rmtree(self.dest, ignore_errors=True)
        with self.cond:             # readers map from ``root``: it moves with ``complete``, atomically
            os.rename(self.part, self.dest)
            self.complete = True
            self.cond.notify_all()
        fsync_dir(self.dest.parent)
        for name in ("progress.json", "seen.u64"):      # only a partial build needs them
            (self.dest / name).unlink(missing_ok=True)
