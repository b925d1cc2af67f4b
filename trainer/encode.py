"""JSONL file -> token examples, in batches, with a truncation policy and a by-line data report.

The fast path of :mod:`trainer.data` (whose ``tokenize_record`` stays the per-record reference):

* every line is read once, checked (``core.validation.check_record``) and accounted for: a bad
  line is reported with its kind and line number, never silently skipped;
* the chat template renders once per record (``render_jinja_template`` with generation indices
  when the template has ``{% generation %}`` markers; else one render plus a search of the
  turns in the rendered text, checked against the reference on the file's first records), and the
  tokenizer's Rust batch API tokenizes a whole batch at once (parallel when
  ``TOKENIZERS_PARALLELISM`` allows);
* over-long records follow ``truncation``: ``keep_answer`` (default) cuts the prompt from the
  left, after the system message, before it cuts an answer, and splits plain text into
  ``max_length`` chunks (one token of overlap, so every token but the first is trained once);
  ``truncate`` cuts the end; ``drop`` drops the record. Every cut is in the report.

Output: ``Encoded(line, ids, mask)`` with ``mask[0] == 0`` (position 0 is never predicted).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from trainer.chat_render import ChatRenderer, mask_by_boundaries, mask_from_spans, tokens_before
from trainer.data import (DataError, DataReport, _chat_template, _eos_id, _special_prefix, prompt_and_completion,
                          record_to_messages, tokenize_record)

log = logging.getLogger(__name__)

TRUNCATION_POLICIES = ("keep_answer", "truncate", "drop")
BATCH_RECORDS = 1024        # records tokenized per batch call
VERIFY_RECORDS = 32         # records checked against the reference when the turns are searched for

#: the keys each format reads; anything else in a record is reported as ``unknown_keys``
FORMAT_KEYS = {"messages": {"messages", "tools"}, "sharegpt": {"conversations", "system", "tools"},
               "prompt_completion": {"prompt", "completion"},
               "alpaca": {"instruction", "input", "output", "system"}, "text": {"text"}}

_BOM = b"\xef\xbb\xbf"


@dataclass
class Encoded:
    line: int
    ids: np.ndarray      # int32
    mask: np.ndarray     # uint8, 1 where the token carries a loss


# --------------------------------------------------------------------------------------- reading

class LineChecker:
    """Turns raw JSONL lines into good records, reporting every other non-blank line by kind;
    a record repeating an earlier line (of those seen by this checker) is reported as
    ``duplicate`` and trained as given."""

    def __init__(self, report: DataReport) -> None:
        self.report = report
        self.seen: set[bytes] = set()
        self.new: list[bytes] = []          # digests added since the caller last took them

    def check(self, lineno: int, raw: bytes) -> dict | None:
        from core.records import check_record, detect_format, problem_kind

        report = self.report
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        raw = raw.strip()
        if not raw:
            return None
        try:
            record = json.loads(raw)
        except UnicodeDecodeError:
            report.add("invalid_utf8", lineno)
            return None
        except ValueError:
            report.add("invalid_json", lineno)
            return None
        if not isinstance(record, dict):
            report.add("not_an_object", lineno)
            return None
        rec_fmt = detect_format(record)
        if rec_fmt is None:
            report.add("unknown_format", lineno)
            return None
        if report.format is None:
            report.format = rec_fmt
        if rec_fmt != report.format:
            report.add("mixed_format", lineno)
            return None
        problems = check_record(record, rec_fmt)
        if problems:
            report.add(problem_kind(problems[0]), lineno)
            return None
        extra = set(record) - FORMAT_KEYS[rec_fmt]
        if extra:
            report.add("unknown_keys", lineno, keys=sorted(extra)[:5])
        digest = hashlib.blake2b(raw, digest_size=8).digest()
        if digest in self.seen:
            report.add("duplicate", lineno)
        else:
            self.seen.add(digest)
            self.new.append(digest)
        return record


def first_format(path: Path, limit: int = 10000) -> str | None:
    """The format of the file's first detectable record, in file order (as the daemon's
    validation decides it), looking at most *limit* lines."""
    from core.records import detect_format

    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno > limit:
                return None
            try:
                fmt = detect_format(json.loads(raw.removeprefix(_BOM) if lineno == 1 else raw))
            except ValueError:
                continue
            if fmt is not None:
                return fmt
    return None


def read_records(path: Path, report: DataReport) -> Iterator[tuple[int, dict]]:
    """(line, record) of every good record of *path*, in file order (see LineChecker)."""
    checker = LineChecker(report)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            record = checker.check(lineno, raw)
            if record is not None:
                yield lineno, record


# --------------------------------------------------------------------------------------- fitting

def fit(ids: np.ndarray, mask: np.ndarray, *, keep: int, max_length: int, policy: str, chunk: bool,
        line: int, report: DataReport) -> list[tuple[np.ndarray, np.ndarray]]:
    """The examples one record becomes under the truncation *policy* (see the module doc)."""
    n = len(ids)
    if n <= max_length:
        return [(ids, mask)]
    if policy == "drop":
        report.add("dropped_too_long", line, tokens=n)
        return []
    if not chunk and keep >= max_length // 2:   # a system turn too long to keep: cut from the very left
        keep = 0
    if policy == "truncate":
        report.add("truncated", line, tokens_cut=n - max_length,
                   answer_tokens_cut=int(mask[max_length:].sum()))
        return [(ids[:max_length], mask[:max_length])]
    if chunk:   # plain text: max_length pieces overlapping by one token
        step, out = max_length - 1, []
        for start in range(0, n - 1, step):
            piece_ids, piece_mask = ids[start:start + max_length], mask[start:start + max_length].copy()
            piece_mask[0] = 0
            if piece_mask.any():
                out.append((piece_ids, piece_mask))
        report.add("chunked", line, pieces=len(out))
        return out
    # keep_answer: cut tokens [keep, keep + excess) (the prompt, from the left, after the system
    # turn); when the last answer alone does not fit, cut up to it and truncate its end.
    excess = n - max_length
    trained = np.flatnonzero(mask)
    last_start = keep
    if len(trained):
        runs = np.flatnonzero(np.diff(trained) > 1)
        last_start = int(trained[runs[-1] + 1]) if len(runs) else int(trained[0])
    last_start = max(last_start, keep)
    cut_end = keep + excess
    joined = True               # tokens were removed right after position keep
    if cut_end <= last_start:
        new_ids = np.concatenate([ids[:keep], ids[cut_end:]])
        new_mask = np.concatenate([mask[:keep], mask[cut_end:]])
        answer_cut = int(mask[keep:cut_end].sum())
    else:
        new_ids = np.concatenate([ids[:keep], ids[last_start:]])[:max_length]
        new_mask = np.concatenate([mask[:keep], mask[last_start:]])[:max_length]
        answer_cut = int(mask.sum()) - int(new_mask.sum())
        joined = last_start > keep
    new_mask = new_mask.copy()
    if joined and keep < len(new_mask):
        answer_cut += int(new_mask[keep])
        new_mask[keep] = 0          # the first token after the cut is not predicted from the system turn
    report.add("truncated", line, tokens_cut=n - len(new_ids), answer_tokens_cut=answer_cut)
    return [(new_ids, new_mask)]


# --------------------------------------------------------------------------------------- encoding

class Encoder:
    """Batches of ``(line, record)`` -> ``Encoded`` examples, accounting in *report*."""

    def __init__(self, tokenizer: Any, fmt: str, *, max_length: int, truncation: str,
                 report: DataReport) -> None:
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, not {truncation!r}")
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        self.tok, self.fmt, self.max_length, self.policy, self.report = tokenizer, fmt, max_length, truncation, report
        self.backend = tokenizer.backend_tokenizer
        has_tpl = _chat_template(tokenizer) is not None
        self.chat = fmt in ("messages", "sharegpt") or (fmt in ("prompt_completion", "alpaca") and has_tpl)
        if fmt in ("messages", "sharegpt") and not has_tpl:
            raise DataError(f"format {fmt!r} needs a chat template and the tokenizer has none")
        self.renderer = ChatRenderer(tokenizer) if self.chat else None
        self.prefix = _special_prefix(tokenizer)
        if fmt == "text" and not self.prefix:
            self.prefix = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _eos_id(tokenizer)]
        self.eos = _eos_id(tokenizer) if not self.chat else None
        self.checked = 0

    def _ids(self, texts: list[str]) -> list[Any]:
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def encode(self, batch: list[tuple[int, dict]]) -> list[Encoded]:
        self.report.records += len(batch)
        self._no_answer: set[int] = set()
        pairs = self._encode_chat(batch) if self.chat else self._encode_plain(batch)
        out: list[Encoded] = []
        for line, ids, mask, keep in pairs:
            if not mask[1:].any():
                if line not in self._no_answer:          # else already reported as no_assistant_turn
                    self.report.add("dropped_empty", line)
                continue
            mask[0] = 0
            for pid, pmask in fit(ids, mask, keep=keep, max_length=self.max_length, policy=self.policy,
                                  chunk=self.fmt == "text", line=line, report=self.report):
                if not pmask.any():      # truncation left nothing to train
                    self.report.add("dropped_empty", line)
                    continue
                out.append(Encoded(line, pid, pmask))
                self.report.examples += 1
                self.report.tokens += len(pid)
                self.report.trained_tokens += int(pmask.sum())
        return out

    def _reference(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        ids, labels = tokenize_record(record, self.fmt, self.tok)
        return (np.asarray(ids, dtype=np.int32),
                np.asarray([x != -100 for x in labels], dtype=np.uint8))

    def _encode_chat(self, batch: list[tuple[int, dict]]) -> list[tuple[int, np.ndarray, np.ndarray, int]]:
        assert self.renderer is not None
        convs = []
        for line, record in batch:
            msgs, trained = record_to_messages(record, self.fmt)
            roles = [m["role"] for m in msgs]
            if "user" not in roles:
                self.report.add("no_user_turn", line)
            if not any(trained):
                self.report.add("no_assistant_turn", line)
                self._no_answer.add(line)
            elif any(t and not m["content"].strip() for m, t in zip(msgs, trained)):
                self.report.add("empty_assistant_content", line)
            convs.append((msgs, trained))
        rendered = self.renderer.render(convs)
        idx = [k for k, r in enumerate(rendered) if r is not None]
        encs = self._ids([rendered[k][0] for k in idx]) if idx else []   # type: ignore[index]
        by_k = dict(zip(idx, encs))
        out = []
        for k, (line, record) in enumerate(batch):
            r = rendered[k]
            if r is None:
                ids, mask = self._reference(record)
                keep = 0
            else:
                enc = by_k[k]
                ids = np.asarray(enc.ids, dtype=np.int32)
                found = mask_by_boundaries(enc, len(ids), r[1], r[2])
                if found is None:    # a boundary inside no token: map every token's offsets
                    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                    found = mask_from_spans(offsets, r[1]), tokens_before(offsets, r[2])
                mask, keep = found
                if self.renderer.search_ok is None and not self._verify(record, ids, mask):
                    ids, mask = self._reference(record)
                    keep = 0
            out.append((line, ids, mask, keep))
        return out

    def state(self) -> dict[str, Any]:
        """What a continued build needs to tokenize exactly as an uninterrupted one."""
        return {"search_ok": self.renderer.search_ok if self.renderer else None, "checked": self.checked}

    def restore(self, state: dict[str, Any] | None) -> None:
        if state and self.renderer is not None and not self.renderer.markers:
            self.renderer.search_ok, self.checked = state.get("search_ok"), int(state.get("checked") or 0)

    def _verify(self, record: dict, ids: np.ndarray, mask: np.ndarray) -> bool:
        """The searched turns must equal the reference on the first records, else it is not used."""
        assert self.renderer is not None
        ref_ids, ref_mask = self._reference(record)
        if not (np.array_equal(ref_ids, ids) and np.array_equal(ref_mask[1:], mask[1:])):
            log.warning("the chat template renders turns in a way the one-pass search does not follow; "
                        "this file is tokenized with the slower per-turn rendering")
            self.renderer.search_ok = False
            return False
        self.checked += 1
        if self.checked >= VERIFY_RECORDS:
            self.renderer.search_ok = True
        return True

    def _encode_plain(self, batch: list[tuple[int, dict]]) -> list[tuple[int, np.ndarray, np.ndarray, int]]:
        out = []
        pre = np.asarray(self.prefix, dtype=np.int32)
        if self.fmt == "text":
            for (line, _rec), enc in zip(batch, self._ids([r["text"] for _, r in batch])):
                ids = np.concatenate([pre, np.asarray(enc.ids, dtype=np.int32), [self.eos]]).astype(np.int32)
                mask = np.ones(len(ids), dtype=np.uint8)
                mask[:len(pre)] = 0
                out.append((line, ids, mask, len(pre)))
            return out
        pcs = [prompt_and_completion(r, self.fmt) for _, r in batch]
        p_encs = self._ids([p for p, _ in pcs])
        c_encs = self._ids([c for _, c in pcs])
        for (line, _rec), pe, ce in zip(batch, p_encs, c_encs):
            p = np.concatenate([pre, np.asarray(pe.ids, dtype=np.int32)]).astype(np.int32)
            c = np.concatenate([np.asarray(ce.ids, dtype=np.int32), [self.eos]]).astype(np.int32)
            ids = np.concatenate([p, c])
            mask = np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(c), np.uint8)])
            out.append((line, ids, mask, len(pre)))
        return out


def encode_file(path: Path, tokenizer: Any, *, max_length: int, truncation: str = "keep_answer",
                fmt: str | None = None, progress: Callable[[int], None] | None = None,
                report: DataReport | None = None) -> Iterator[Encoded]:
    """Every example of *path* in file order; *report* (filled as it goes) accounts for each line.
    ``progress(lines read)`` is called after each batch."""
    report = report if report is not None else DataReport(format=fmt or "")
    report.format = fmt or report.format or None   # type: ignore[assignment]
    report.truncation, report.max_length = truncation, max_length
    encoder: Encoder | None = None
    batch: list[tuple[int, dict]] = []
    done = 0

    def flush() -> Iterator[Encoded]:
        nonlocal encoder, done
        if encoder is None:
            encoder = Encoder(tokenizer, str(report.format), max_length=max_length,
                              truncation=truncation, report=report)
        yield from encoder.encode(batch)
        done = batch[-1][0]
        batch.clear()
        if progress is not None:
            progress(done)

    for item in read_records(Path(path), report):
        batch.append(item)
        if len(batch) >= BATCH_RECORDS:
            yield from flush()
    if batch:
        yield from flush()
