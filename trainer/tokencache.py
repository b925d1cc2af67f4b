"""Tokenized datasets on disk: built once, memory-mapped, reused by resumes, retries and epochs.

A cache entry is a folder ``<home>/cache/tokens/<sha256[:16]>-<key>/`` named after everything the
tokens depend on: the file's sha256, the tokenizer (vocabulary, merges, special tokens), the
chat template, ``max_length``, the truncation policy and this module's format version. It holds

* ``ids.i32``   every example's token ids, back to back (int32);
* ``mask.u8``   1 where the token carries a loss (uint8), aligned with ``ids.i32``;
* ``offsets.npy`` example k is ``[offsets[k], offsets[k+1])`` (int64, n+1 entries);
* ``lines.npy`` the file line of each example (int64);
* ``report.json`` the data report (``trainer.data.DataReport``);
* ``meta.json`` the key's parts and the counts, written last.

It is built in a ``.building-*`` folder and renamed into place, so an entry either is complete
or does not exist; a build killed half-way leaves a folder that the next build removes. Reading
it maps the arrays: memory stays flat however large the file (pages come and go with the page
cache), and a 1M-record file needs no Python list of its tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from daemon.atomic import atomic_write_json, fsync_dir
from trainer.data import IGNORE_INDEX, DataReport, Example, _chat_template, count_lines

log = logging.getLogger(__name__)

CACHE_VERSION = 1
WRITE_BLOCK = 1 << 22          # tokens buffered before a write


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of what tokenization depends on: the backend's JSON (vocabulary, merges,
    normalizer, pre-tokenizer, added tokens) and the special tokens."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(sha256: str, tokenizer: Any, *, max_length: int, truncation: str) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "file_sha256": sha256, "tokenizer": tokenizer_hash(tokenizer),
            "template": hashlib.sha256((_chat_template(tokenizer) or "").encode()).hexdigest(),
            "max_length": int(max_length), "truncation": truncation}


def entry_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"{key['file_sha256'][:16]}-{digest[:16]}"


class TokenData:
    """The examples of one cache entry, memory-mapped; ``data[i]`` is an ``Example``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta = json.loads((root / "meta.json").read_text())
        self.report = DataReport.from_json(json.loads((root / "report.json").read_text()))
        self.offsets = np.load(root / "offsets.npy")
        self.lines = np.load(root / "lines.npy")
        n_tokens = int(self.offsets[-1]) if len(self.offsets) else 0
        if n_tokens:
            self.ids = np.memmap(root / "ids.i32", dtype=np.int32, mode="r", shape=(n_tokens,))
            self.mask = np.memmap(root / "mask.u8", dtype=np.uint8, mode="r", shape=(n_tokens,))
        else:
            self.ids, self.mask = np.zeros(0, np.int32), np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> Example:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b]
        labels = np.where(self.mask[a:b].astype(bool), ids, IGNORE_INDEX)
        return Example(input_ids=ids.tolist(), labels=labels.tolist(), line=int(self.lines[i]))


class Subset(Sequence[Example]):
    """Some examples of a TokenData, by index, in the given order."""

    def __init__(self, data: TokenData, indices: Sequence[int]) -> None:
        self.data, self.indices = data, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Example:   # type: ignore[override]
        return self.data[int(self.indices[i])]

    @property
    def lengths(self) -> np.ndarray:
        return self.data.lengths[self.indices]


def open_entry(root: Path) -> TokenData | None:
    """The cache entry at *root* if it is complete and readable, else None."""
    if not (root / "meta.json").is_file():
        return None
    try:
        return TokenData(root)
    except (OSError, ValueError) as exc:
        log.warning("token cache %s is unreadable (%s); it is rebuilt", root, exc)
        return None


def _write(fh: Any, arrays: list[np.ndarray]) -> None:
    if arrays:
        fh.write(np.concatenate(arrays).tobytes())


def build(path: Path, tokenizer: Any, *, dest: Path, key: dict[str, Any], max_length: int, truncation: str,
          progress: Callable[[int, int], None] | None = None) -> TokenData:
    """Tokenize *path* into the cache entry *dest* (see the module doc) and open it."""
    from trainer.encode import encode_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".building-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    total = count_lines(path)
    report = DataReport(format=None)
    offsets, lines = [0], []
    buf_ids: list[np.ndarray] = []
    buf_mask: list[np.ndarray] = []
    buffered = 0
    t0 = time.monotonic()
    with open(tmp / "ids.i32", "wb") as f_ids, open(tmp / "mask.u8", "wb") as f_mask:
        for ex in encode_file(path, tokenizer, max_length=max_length, truncation=truncation, report=report,
                              progress=None if progress is None else (lambda done: progress(done, total))):
            buf_ids.append(ex.ids)
            buf_mask.append(ex.mask)
            offsets.append(offsets[-1] + len(ex.ids))
            lines.append(ex.line)
            buffered += len(ex.ids)
            if buffered >= WRITE_BLOCK:
                _write(f_ids, buf_ids)
                _write(f_mask, buf_mask)
                buf_ids, buf_mask, buffered = [], [], 0
        _write(f_ids, buf_ids)
        _write(f_mask, buf_mask)
        for fh in (f_ids, f_mask):
            fh.flush()
            os.fsync(fh.fileno())
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(tmp / "lines.npy", np.asarray(lines, dtype=np.int64))
    for name in ("offsets.npy", "lines.npy"):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    atomic_write_json(tmp / "report.json", report.to_json())
    atomic_write_json(tmp / "meta.json", {**key, "examples": len(lines), "tokens": offsets[-1],
                                          "records": report.records, "built_s": round(time.monotonic() - t0, 2),
                                          "source": str(path)})
    try:
        os.rename(tmp, dest)
    except OSError:          # built meanwhile by another process: use that one
        shutil.rmtree(tmp, ignore_errors=True)
        if open_entry(dest) is None:
            raise
    fsync_dir(dest.parent)
    return TokenData(dest)


def remove_partial(root: Path) -> None:
    """Remove half-built entries (a build killed mid-way) older than this process."""
    if not root.is_dir():
        return
    for p in root.glob(".building-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            shutil.rmtree(p, ignore_errors=True)


def prepare(path: Path, tokenizer: Any, *, cache_root: Path, sha256: str, max_length: int, truncation: str,
            progress: Callable[[int, int], None] | None = None) -> tuple[TokenData, bool]:
    """(the tokenized examples of *path*, whether the cache had them)."""
    key = cache_key(sha256, tokenizer, max_length=max_length, truncation=truncation)
    dest = cache_root / entry_name(key)
    data = open_entry(dest)
    if data is not None and data.meta.get("file_sha256") == sha256:
        return data, True
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    remove_partial(cache_root)
    return build(Path(path), tokenizer, dest=dest, key=key, max_length=max_length, truncation=truncation,
                 progress=progress), False
