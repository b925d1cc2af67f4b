"""Tokenized datasets on disk: built once, in the background, memory-mapped, reused by resumes,
retries and epochs.

A cache entry is a folder ``<home>/cache/tokens/<sha256[:16]>-<key>/`` named after everything the
tokens depend on: the file's sha256, the tokenizer (vocabulary, merges, special tokens), the chat
template, ``max_length``, the truncation policy, the shuffle seed and this module's version.

The file's lines are visited in a seeded random order (a *position* is an index into that order):
the cache is in that order, so the first positions are a random sample of the file and training
can start on them while the rest is tokenized (trainer/plan.py). Files, all raw little-endian:

* ``ids.i32``  every example's token ids, back to back; ``mask.u8`` 1 where a token carries a loss;
* ``ends.i64`` example k is ``[ends[k-1], ends[k])``; ``lines.i64`` its line in the file;
* ``pos_end.i64`` the number of examples made from positions ``[0, p]`` (a bad line makes none,
  a chunked text several), so positions map to examples;
* ``report.json`` the data report; ``meta.json`` the key's parts and the counts, written last.

Entries are built in the background, block by block, resumably (trainer/tokenbuild.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from trainer.data import IGNORE_INDEX, DataReport, Example, _chat_template

if TYPE_CHECKING:
    from trainer.tokenbuild import Build

log = logging.getLogger(__name__)

CACHE_VERSION = 2
ARRAYS = {"ids": ("ids.i32", np.int32), "mask": ("mask.u8", np.uint8), "ends": ("ends.i64", np.int64),
          "lines": ("lines.i64", np.int64), "pos_end": ("pos_end.i64", np.int64)}


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of what tokenization depends on: the backend's JSON (vocabulary, merges,
    normalizer, pre-tokenizer, added tokens) and the special tokens."""
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(sha256: str, tokenizer: Any, *, max_length: int, truncation: str, seed: int = 0) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "file_sha256": sha256, "tokenizer": tokenizer_hash(tokenizer),
            "template": hashlib.sha256((_chat_template(tokenizer) or "").encode()).hexdigest(),
            "max_length": int(max_length), "truncation": truncation, "seed": int(seed)}


def entry_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"{key['file_sha256'][:16]}-{digest[:16]}"


def line_order(n_lines: int, seed: int) -> np.ndarray:
    """The visiting order of the lines (0-based), a pure function of (n_lines, seed)."""
    return np.random.default_rng([int(seed), 0x70C0]).permutation(n_lines).astype(np.int64)


def _map(root: Path, name: str, count: int) -> np.ndarray:
    fname, dtype = ARRAYS[name]
    if count <= 0:
        return np.zeros(0, dtype)
    return np.memmap(root / fname, dtype=dtype, mode="r", shape=(count,))


class TokenData:
    """The examples of a (complete or growing) entry, memory-mapped; ``data[i]`` is an Example."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.counts = {"examples": 0, "tokens": 0, "positions": 0}
        self.ids = self.mask = self.ends = self.lines = self.pos_end = np.zeros(0, np.int64)

    def refresh(self, root: Path, examples: int, tokens: int, positions: int) -> None:
        if (root, examples, tokens, positions) == (self.root, *self.counts.values()):
            return
        self.root = root
        self.counts = {"examples": examples, "tokens": tokens, "positions": positions}
        self.ids, self.mask = _map(root, "ids", tokens), _map(root, "mask", tokens)
        self.ends, self.lines = _map(root, "ends", examples), _map(root, "lines", examples)
        self.pos_end = _map(root, "pos_end", positions)

    def __len__(self) -> int:
        return self.counts["examples"]

    def start(self, i: int) -> int:
        return int(self.ends[i - 1]) if i else 0

    def lengths(self, a: int, b: int) -> np.ndarray:
        """Lengths of examples a..b-1."""
        ends = np.asarray(self.ends[a:b])
        return np.diff(np.concatenate([[self.start(a)], ends])) if b > a else np.zeros(0, np.int64)

    def examples_of(self, pa: int, pb: int) -> tuple[int, int]:
        """The example range made from positions [pa, pb)."""
        ex = (lambda p: int(self.pos_end[p - 1]) if p else 0)
        return ex(pa), ex(pb)

    def __getitem__(self, i: int) -> Example:
        a, b = self.start(i), int(self.ends[i])
        ids = np.asarray(self.ids[a:b])
        labels = np.where(np.asarray(self.mask[a:b]).astype(bool), ids, IGNORE_INDEX)
        return Example(input_ids=ids.tolist(), labels=labels.tolist(), line=int(self.lines[i]))


class Subset(Sequence[Example]):
    """Examples of a TokenData by index (a range or an array), in that order."""

    def __init__(self, data: TokenData, indices: Sequence[int]) -> None:
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Example:   # type: ignore[override]
        return self.data[int(self.indices[i])]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class TokenStream:
    """What the trainer reads: a complete entry, or one being built (``build`` is then set)."""

    def __init__(self, data: TokenData, meta: dict[str, Any] | None, build: Build | None, dest: Path) -> None:
        self.data, self.meta, self.build, self.dest = data, meta, build, dest

    @property
    def hit(self) -> bool:
        return self.build is None

    @property
    def total(self) -> int:
        return int(self.meta["positions"]) if self.meta else self.build.total   # type: ignore[union-attr]

    @property
    def complete(self) -> bool:
        return self.build is None or self.build.complete

    @property
    def report(self) -> DataReport:
        if self.build is not None:
            return self.build.report_snapshot()
        return DataReport.from_json(_read_json(self.dest / "report.json") or {})

    def wait(self, positions: int, on_wait: Callable[[], None] | None = None) -> None:
        """Block until positions [0, positions) are readable; then ``data`` covers them."""
        b = self.build
        if b is not None:
            b.wait(positions, on_wait)
            with b.cond:
                self.data.refresh(b.root, b.examples, b.tokens, b.positions)

    def wait_complete(self, on_wait: Callable[[], None] | None = None) -> None:
        """Block until the whole entry is built and in place."""
        b = self.build
        if b is not None:
            b.wait(1 << 62, on_wait)
            b.thread.join()
            self.wait(1 << 62)

    def hold(self, held: bool) -> None:
        if self.build is not None:
            self.build.hold(held)

    def close(self) -> None:
        if self.build is not None and self.build.thread.is_alive():
            self.build.stop()


def open_stream(path: Path, tokenizer: Any, *, cache_root: Path, sha256: str, max_length: int, truncation: str,
                seed: int = 0) -> TokenStream:
    """The tokenized examples of *path*: the complete entry when there is one, else a build (new,
    or continuing a partial one) started in the background."""
    key = cache_key(sha256, tokenizer, max_length=max_length, truncation=truncation, seed=seed)
    dest = cache_root / entry_name(key)
    meta = _read_json(dest / "meta.json")
    if isinstance(meta, dict) and meta.get("file_sha256") == sha256 and all(
            (dest / f).is_file() for f, _ in ARRAYS.values()):
        data = TokenData()
        try:
            data.refresh(dest, int(meta["examples"]), int(meta["tokens"]), int(meta["positions"]))
            return TokenStream(data, meta, None, dest)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("token cache %s is unreadable (%s); it is rebuilt", dest, exc)
    from trainer.tokenbuild import Build      # (it imports this module)

    shutil.rmtree(dest, ignore_errors=True)
    remove_stale_partials(cache_root, keep=f".partial-{dest.name}")
    build = Build(path, tokenizer, dest=dest, key=key, max_length=max_length, truncation=truncation).start()
    return TokenStream(TokenData(), None, build, dest)


def remove_stale_partials(root: Path, keep: str) -> None:
    """Partial builds of the same file under another key (another tokenizer, max_length, ...) will
    not be continued: removed. Other files' partial builds wait for their jobs (daemon/retention.py
    removes them once no pending, active or failed job holds the file)."""
    if root.is_dir():
        for p in root.glob(keep.rsplit("-", 1)[0] + "-*"):
            if p.name != keep:
                shutil.rmtree(p, ignore_errors=True)


def prepare(path: Path, tokenizer: Any, *, cache_root: Path, sha256: str, max_length: int, truncation: str,
            seed: int = 0, on_wait: Callable[[], None] | None = None) -> TokenStream:
    """The whole entry, built if need be (blocking)."""
    stream = open_stream(path, tokenizer, cache_root=cache_root, sha256=sha256, max_length=max_length,
                         truncation=truncation, seed=seed)
    stream.wait_complete(on_wait)
    return stream
