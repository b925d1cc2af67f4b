"""Validate a JSONL training file and detect its format, streaming (stdlib only).

One pass, bounded memory: the file is read in binary with a bounded ``readline``, each line is
decoded as UTF-8 on its own and parsed as JSON on its own, so a 10 GB file costs no more memory
than its longest allowed line (``max_line_bytes``).

Every non-blank line is one attempted record. A record is **bad** when its line is broken (too
long, not UTF-8, not JSON, not a JSON object: :data:`LINE_KINDS`), when its keys match no format
or another format than the file's (``unknown_format``, ``mixed_format``), or when it fails
:func:`check_record` (:data:`RECORD_KINDS`). Bad records are skipped by :func:`iter_records`.

* The file is **accepted** (``ok=True``) when it has at least one valid record and at most
  ``max_bad_record_fraction`` (default 1 %) of its records are bad; the bad ones are reported
  (``bad_records``, ``error_counts``, ``bad_lines``: the first line numbers per kind, ``errors``).
* It is **rejected** (``ok=False``, it goes to ``queue/failed/``) otherwise, or when it is not a
  regular file (directory, symlink, FIFO, ...), unreadable, empty, only blank lines or UTF-16/32
  text. ``reason`` names the cause: each kind of problem with its line numbers, and the share
  of bad records against the threshold.

The file's format is the format of its first record whose format can be detected. The schema
checks follow the OpenAI cookbook's chat-data checker (data type, missing messages list, message
missing key, unrecognized key, unrecognized role, missing content, no assistant message).

Problems returned by :func:`check_record` are strings ``"kind: detail"``; ``kind`` (the part
before the first colon, see :func:`problem_kind`) is a stable snake_case name listed in
:data:`RECORD_KINDS`; the detail names the format and what is wrong ("alpaca record without
'output'"). Line-level kinds are in :data:`LINE_KINDS`.
"""
from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

logger = logging.getLogger(__name__)

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text")

#: Kinds of a broken line (or a record of another format than the file's).
LINE_KINDS = ("line_too_long", "invalid_utf8", "invalid_json", "not_an_object", "mixed_format")

#: Kinds of a record-level problem (the record fails :func:`check_record` or has no format).
RECORD_KINDS = (
    "unknown_format",
    # messages (OpenAI chat)
    "missing_messages",
    "messages_not_list",
    "empty_messages",
    "message_not_object",
    "message_missing_key",
    "message_unrecognized_key",
    "unrecognized_role",
    "missing_content",
    "content_not_string",
    "invalid_weight",
    "no_assistant_message",
    "empty_assistant_content",
    # sharegpt
    "missing_conversations",
    "conversations_not_list",
    "empty_conversations",
    "turn_not_object",
    "turn_missing_key",
    "value_not_string",
    # prompt_completion / alpaca / text
    "missing_field",
    "field_not_string",
    "empty_completion",
    "empty_output",
    "empty_text",
)

MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call"}
)
SHAREGPT_ROLES = frozenset(
    {"system", "human", "user", "gpt", "assistant", "tool", "function_call", "observation"}
)
SHAREGPT_ASSISTANT = frozenset({"gpt", "assistant"})

_BOM = b"\xef\xbb\xbf"
_DISCARD_CHUNK = 1 << 20  # bytes read at a time while skipping the rest of an overlong line
_REASON_LINES = 5  # line numbers named per problem in ``reason``
_BAD_LINES = 20  # line numbers kept per kind in ``bad_lines``
_CANCEL_EVERY = 4096  # lines between two looks at ``cancel``
DEFAULT_MAX_BAD_RECORD_FRACTION = 0.01
_MAX_RUNS = 5  # format runs kept per format for the "mixed formats" reason
_MAX_MESSAGE_CHARS = 500  # a LineError message is cut to this length


def detect_format(record: dict) -> str | None:
    """The format a record is in, by its keys (first match wins), or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "conversations" in record:
        return "sharegpt"
    if "text" in record:
        return "text"
    return None


def problem_kind(problem: str) -> str:
    """The stable ``kind`` of a problem string returned by :func:`check_record`."""
    return problem.split(":", 1)[0]


def _p(kind: str, detail: str) -> str:
    return f"{kind}: {detail}"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_JSON_TYPES = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object", type(None): "null"}


def _jtype(value: Any) -> str:
    """The JSON name of a parsed value's type ("a string", "a list", "null", ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


_M = "messages record"


def _check_messages(record: dict) -> list[str]:
    if "messages" not in record:
        return [_p("missing_messages", f"{_M} without 'messages'")]
    messages = record["messages"]
    if not isinstance(messages, list):
        return [_p("messages_not_list", f"{_M} whose 'messages' is {_jtype(messages)}, not a list")]
    if not messages:
        return [_p("empty_messages", f"{_M} with an empty 'messages' list")]
    problems: list[str] = []
    assistant_seen = False
    assistant_has_output = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            problems.append(_p("message_not_object", f"{_M} whose message {i} is {_jtype(msg)}, not an object"))
            continue
        role = msg.get("role")
        content = msg.get("content")
        if type(content) is str and type(role) is str and role in MESSAGE_ROLES and len(msg) == 2:
            # fast path: the plain {"role", "content"} message, nothing else to check
            if role == "assistant":
                assistant_seen = True
                if not assistant_has_output and content and not content.isspace():
                    assistant_has_output = True
            continue
        where = f"{_M} whose message {i}"
        if not MESSAGE_KEYS.issuperset(msg):
            extra = sorted(str(k) for k in msg if k not in MESSAGE_KEYS)
            names = ", ".join(_short(k) for k in extra[:5])
            problems.append(_p("message_unrecognized_key", f"{where} has unrecognized key(s) {names}"))
        has_calls = bool(msg.get("tool_calls")) or bool(msg.get("function_call"))
        if "role" not in msg:
            problems.append(_p("message_missing_key", f"{where} has no 'role'"))
        elif not isinstance(role, str) or role not in MESSAGE_ROLES:
            problems.append(_p("unrecognized_role", f"{where} has role {_short(role)} "
                               f"(expected {', '.join(sorted(MESSAGE_ROLES))})"))
        if "content" not in msg:
            if not has_calls:
                problems.append(_p("message_missing_key", f"{where} has no 'content' (and no tool_calls)"))
        elif content is None:
            if not has_calls:
                problems.append(_p("missing_content", f"{where} has null 'content' and no tool_calls"))
        elif not isinstance(content, str):
            problems.append(_p("content_not_string", f"{where} has 'content' {_jtype(content)}, not a string"))
        if "weight" in msg:
            weight = msg["weight"]
            if isinstance(weight, bool) or weight not in (0, 1):
                problems.append(_p("invalid_weight", f"{where} has weight {_short(weight)}, not 0 or 1"))
        if role == "assistant":
            assistant_seen = True
            if has_calls or (isinstance(content, str) and content and not content.isspace()):
                assistant_has_output = True
    if not assistant_seen:
        problems.append(_p("no_assistant_message", f"{_M} without an assistant turn"))
    elif not assistant_has_output:
        problems.append(
            _p("empty_assistant_content", f"{_M} whose assistant turns are all empty (nothing to learn)")
        )
    return problems


_S = "sharegpt record"


def _check_sharegpt(record: dict) -> list[str]:
    if "conversations" not in record:
        return [_p("missing_conversations", f"{_S} without 'conversations'")]
    turns = record["conversations"]
    if not isinstance(turns, list):
        return [_p("conversations_not_list", f"{_S} whose 'conversations' is {_jtype(turns)}, not a list")]
    if not turns:
        return [_p("empty_conversations", f"{_S} with an empty 'conversations' list")]
    problems: list[str] = []
    assistant_seen = False
    for i, turn in enumerate(turns):
        where = f"{_S} whose turn {i}"
        if not isinstance(turn, dict):
            problems.append(_p("turn_not_object", f"{where} is {_jtype(turn)}, not an object"))
            continue
        for key in ("from", "value"):
            if key not in turn:
                problems.append(_p("turn_missing_key", f"{where} has no {key!r}"))
        if "from" in turn:
            who = turn["from"]
            if not isinstance(who, str) or who not in SHAREGPT_ROLES:
                problems.append(_p("unrecognized_role", f"{where} is from {_short(who)} "
                                   f"(expected {', '.join(sorted(SHAREGPT_ROLES))})"))
            elif who in SHAREGPT_ASSISTANT:
                assistant_seen = True
        if "value" in turn and not isinstance(turn["value"], str):
            problems.append(_p("value_not_string", f"{where} has 'value' {_jtype(turn['value'])}, not a string"))
    if not assistant_seen:
        problems.append(_p("no_assistant_message", f"{_S} without an assistant turn (from 'gpt' or 'assistant')"))
    return problems


def _check_fields(
    record: dict, fmt: str, required: tuple[str, ...], optional: tuple[str, ...], non_empty: str
) -> list[str]:
    problems: list[str] = []
    for key in required:
        if key not in record:
            problems.append(_p("missing_field", f"{fmt} record without {key!r}"))
        elif not isinstance(record[key], str):
            problems.append(
                _p("field_not_string", f"{fmt} record whose {key!r} is {_jtype(record[key])}, not a string")
            )
    for key in optional:
        if key in record and record[key] is not None and not isinstance(record[key], str):
            problems.append(
                _p("field_not_string", f"{fmt} record whose {key!r} is {_jtype(record[key])}, not a string")
            )
    value = record.get(non_empty)
    if isinstance(value, str) and (not value or value.isspace()):
        problems.append(_p(f"empty_{non_empty}", f"{fmt} record with an empty {non_empty!r}"))
    return problems


def check_record(record: dict, fmt: str) -> list[str]:
    """Problems of one record read as format *fmt*; ``[]`` means valid.

    Each problem is ``"kind: detail"`` (see :func:`problem_kind`); the detail names the format and
    what is wrong or missing ("alpaca record without 'output'", "messages record without an
    assistant turn"). Whitespace-only completion/output/text counts as empty. In ``messages``,
    ``content`` may be null or absent only when the message has ``tool_calls`` (or legacy
    ``function_call``); ``input`` of alpaca may be absent or null.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(record, dict):
        return [_p("not_an_object", f"{fmt} record is {_jtype(record)}, not an object")]
    if fmt == "messages":
        return _check_messages(record)
    if fmt == "sharegpt":
        return _check_sharegpt(record)
    if fmt == "prompt_completion":
        return _check_fields(record, fmt, ("prompt", "completion"), (), "completion")
    if fmt == "alpaca":
        return _check_fields(record, fmt, ("instruction", "output"), ("input",), "output")
    return _check_fields(record, fmt, ("text",), (), "text")


@dataclass
class LineError:
    line: int
    kind: str
    message: str  # what is wrong, ending with "(line N)"


class ValidationCancelled(Exception):
    """:func:`validate_file` was told to stop (its ``cancel`` returned True) before the end."""


@dataclass
class ValidationReport:
    path: str
    ok: bool
    reason: str | None
    format: str | None
    lines: int = 0
    blank_lines: int = 0
    records: int = 0  # non-blank lines, each one attempted record
    valid_records: int = 0
    error_counts: dict[str, int] = field(default_factory=dict)  # kind -> offending lines
    errors: list[LineError] = field(default_factory=list)  # first max_errors, in line order
    format_counts: dict[str, int] = field(default_factory=dict)  # format -> records detected
    bad_records: int = 0  # records that will not be trained on (broken, wrong format, invalid)
    bad_lines: dict[str, list[int]] = field(default_factory=dict)  # kind -> first 20 line numbers
    max_bad_record_fraction: float = DEFAULT_MAX_BAD_RECORD_FRACTION  # the threshold applied
    summary: str | None = None  # the bad records in words (kinds, lines), None when there are none

    @property
    def skipped_records(self) -> int:
        """Non-blank lines that will not be trained on."""
        return self.records - self.valid_records

    @property
    def bad_fraction(self) -> float:
        return self.bad_records / self.records if self.records else 0.0

    @property
    def errors_truncated(self) -> bool:
        """True when more lines are wrong than ``errors`` lists."""
        return self.records - self.valid_records > len(self.errors)

    def first_error_lines(self) -> list[int]:
        return [e.line for e in self.errors]

    def to_json(self) -> dict:
        data = asdict(self)
        data["skipped_records"] = self.skipped_records
        data["errors_truncated"] = self.errors_truncated
        return data

    @classmethod
    def from_json(cls, data: dict) -> ValidationReport:
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["errors"] = [LineError(**e) for e in data.get("errors", [])]
        return cls(**kwargs)


def _open_regular(path: Path) -> tuple[BinaryIO | None, str | None, int]:
    """Open *path* for binary reading without following a symlink.

    Returns (file, None, size) or (None, reason, 0).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, "file not found", 0
    except OSError as exc:
        return None, f"cannot stat file: {exc.strerror or exc}", 0
    if stat.S_ISLNK(st.st_mode):
        return None, "not a regular file: it is a symlink (symlinks are never followed)", 0
    if stat.S_ISDIR(st.st_mode):
        return None, "not a regular file: it is a directory", 0
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file (FIFO, socket or device)", 0
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        return None, f"cannot open file: {exc.strerror or exc}", 0
    try:
        st2 = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        return None, f"cannot stat file: {exc.strerror or exc}", 0
    if not stat.S_ISREG(st2.st_mode):  # swapped between lstat and open
        os.close(fd)
        return None, "not a regular file (it changed while being opened)", 0
    return os.fdopen(fd, "rb"), None, st2.st_size


# One scanned line: (line number, event, payload)
#   event "blank":  payload None
#   event "error":  payload (kind, message)
#   event "record": payload dict
_Scanned = tuple[int, str, Any]


def _scan(fh: BinaryIO, max_line_bytes: int) -> Iterator[_Scanned]:
    """Classify each line of *fh*, reading at most ``max_line_bytes + 1`` bytes at once."""
    lineno = 0
    limit = max_line_bytes + 1
    while True:
        raw = fh.readline(limit)
        if not raw:
            return
        lineno += 1
        if len(raw) == limit and not raw.endswith(b"\n"):
            total = len(raw)
            while True:  # discard the rest of the line, chunk by chunk
                rest = fh.readline(_DISCARD_CHUNK)
                total += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, "error", (
                "line_too_long",
                f"line is {total} bytes, more than the limit of {max_line_bytes}",
            )
            continue
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, "error", (
                "invalid_utf8",
                f"not valid UTF-8 at byte {exc.start} of the line ({exc.reason})",
            )
            continue
        if not text or text.isspace():
            yield lineno, "blank", None
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield lineno, "error", ("invalid_json", f"{exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            yield lineno, "error", ("invalid_json", "JSON nested too deeply")
            continue
        except ValueError as exc:  # e.g. integer with too many digits
            yield lineno, "error", ("invalid_json", str(exc)[:200])
            continue
        if not isinstance(record, dict):
            yield lineno, "error", (
                "not_an_object",
                f"JSON value is {type(record).__name__}, not an object",
            )
            continue
        yield lineno, "record", record


def _line_list(lines: list[int], total: int) -> str:
    lines = lines[:_REASON_LINES]
    word = "line" if total == 1 else "lines"
    text = f"{word} " + ", ".join(str(n) for n in lines)
    if total > len(lines):
        text += f" and {total - len(lines)} more"
    return text


def _runs_text(runs: list[list[int]], n_runs: int) -> str:
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    single = len(runs) == 1 and runs[0][0] == runs[0][1] and n_runs == 1
    text = ("line " if single else "lines ") + ", ".join(parts)
    if n_runs > len(runs):
        text += f" (+{n_runs - len(runs)} more runs)"
    return text


def _pct(x: float, other: float | None = None) -> str:
    """*x* as a percentage with 3 significant digits, more when needed to differ from *other*."""
    for digits in (3, 4, 5, 6, 8):
        text = f"{x * 100:.{digits}g} %"
        if other is None or x == other or text != f"{other * 100:.{digits}g} %":
            return text
    return f"{x * 100!r} %"


_KIND_TEXT = {
    "line_too_long": "line too long",
    "invalid_utf8": "invalid UTF-8",
    "invalid_json": "invalid JSON",
    "not_an_object": "JSON value not an object",
}

_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "UTF-32", "FF FE 00 00"),
    (b"\x00\x00\xfe\xff", "UTF-32", "00 00 FE FF"),
    (b"\xff\xfe", "UTF-16", "FF FE"),
    (b"\xfe\xff", "UTF-16", "FE FF"),
)


def _wide_text_reason(head: bytes) -> str | None:
    """Why the first bytes of a file say it is UTF-16/32 text, not UTF-8 (None if they don't)."""
    for bom, name, hexed in _BOMS:
        if head.startswith(bom):
            return f"{name} text (BOM {hexed}): convert to UTF-8 (e.g. iconv -f {name} -t UTF-8)"
    sample = head[: len(head) & ~1]
    if len(sample) >= 8:  # UTF-16 without BOM: ASCII text with a NUL byte beside every character
        even, odd = sample[0::2], sample[1::2]
        for zeros, other, order in ((odd, even, "little-endian"), (even, odd, "big-endian")):
            if zeros.count(0) >= 0.9 * len(zeros) and other.count(0) <= 0.1 * len(other):
                return (f"UTF-16 text ({order}, no BOM: a NUL byte beside every character): "
                        "convert to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    return None


class _Bad:
    """What is known about one kind of bad record: how many, where, and its first detail."""

    __slots__ = ("count", "lines", "detail", "same")

    def __init__(self) -> None:
        self.count = 0
        self.lines: list[int] = []
        self.detail: str | None = None
        self.same = True  # every record of this kind had the same detail

    def add(self, line: int, detail: str | None) -> None:
        self.count += 1
        if len(self.lines) < _BAD_LINES:
            self.lines.append(line)
        if self.detail is None:
            self.detail = detail
        elif detail != self.detail:
            self.same = False


def _describe_bad(bad: dict[str, _Bad], runs: dict[str, list[list[int]]], n_runs: dict[str, int]) -> str:
    """The bad records in words, each kind once, in the order of its first line."""
    parts: list[str] = []
    for kind, b in sorted(bad.items(), key=lambda kv: kv[1].lines[0] if kv[1].lines else 0):
        if kind == "mixed_format":
            parts.append("mixed formats: " + ", ".join(
                f"{name} on {_runs_text(runs[name], n_runs[name])}" for name in runs))
        elif kind in _KIND_TEXT:
            parts.append(f"{_KIND_TEXT[kind]} on {_line_list(b.lines, b.count)}")
        elif b.same or b.count == 1:
            parts.append(f"{b.detail} ({_line_list(b.lines, b.count)})")
        else:  # the same kind with other details elsewhere: name the first, count them all
            parts.append(f"{b.detail} (line {b.lines[0]}; {b.count} records with {kind} on "
                         f"{_line_list(b.lines, b.count)})")
    return "; ".join(parts)


def validate_file(
    path: Path,
    *,
    max_bad_record_fraction: float = DEFAULT_MAX_BAD_RECORD_FRACTION,
    max_errors: int = 20,
    max_line_bytes: int = 64 * 1024 * 1024,
    cancel: Callable[[], bool] | None = None,
) -> ValidationReport:
    """Check a whole JSONL file in one streaming pass; never raises for bad content.

    The file is accepted when at least one record is valid and at most
    ``max_bad_record_fraction`` of its records are bad (see the module doc). ``cancel``, when
    given, is called every few thousand lines; when it returns True the pass stops with
    :class:`ValidationCancelled`.
    """
    if not 0 <= max_bad_record_fraction < 1:
        raise ValueError(f"max_bad_record_fraction must be in [0, 1), not {max_bad_record_fraction!r}")
    path = Path(path)
    report = ValidationReport(path=str(path), ok=False, reason=None, format=None,
                              max_bad_record_fraction=max_bad_record_fraction)
    fh, why, size = _open_regular(path)
    if fh is None:
        report.reason = why
        logger.info("rejected %s: %s", path, why)
        return report
    if size == 0:
        fh.close()
        report.reason = "empty file (0 bytes)"
        logger.info("rejected %s: %s", path, report.reason)
        return report

    bad: dict[str, _Bad] = {}  # kind -> its records
    fmt: str | None = None
    # format -> [[start, end], ...] runs of consecutive records, first _MAX_RUNS only
    runs: dict[str, list[list[int]]] = {}
    n_runs: dict[str, int] = {}
    prev_fmt: str | None = None

    def add_error(line: int, kind: str, detail: str) -> None:
        bad.setdefault(kind, _Bad()).add(line, detail)
        if len(report.errors) < max_errors:
            message = f"{detail} (line {line})"
            if len(message) > _MAX_MESSAGE_CHARS:
                message = detail[: _MAX_MESSAGE_CHARS - 13] + f"... (line {line})"
            report.errors.append(LineError(line=line, kind=kind, message=message))

    try:
        with fh:
            head = fh.read(4096)
            wide = _wide_text_reason(head)
            if wide is not None:
                report.reason = wide
                logger.info("rejected %s: %s", path, wide)
                return report
            fh.seek(0)
            for lineno, event, payload in _scan(fh, max_line_bytes):
                report.lines = lineno
                if cancel is not None and not lineno % _CANCEL_EVERY and cancel():
                    raise ValidationCancelled(f"{path}: validation cancelled at line {lineno}")
                if event == "blank":
                    report.blank_lines += 1
                    continue
                report.records += 1
                if event == "error":
                    add_error(lineno, *payload)
                    continue
                rec_fmt = detect_format(payload)
                if rec_fmt is None:
                    keys = ", ".join(_short(str(k), 30) for k in list(payload)[:8])
                    add_error(
                        lineno,
                        "unknown_format",
                        f"record whose keys [{keys}] match no known format ({', '.join(FORMATS)})",
                    )
                    continue
                report.format_counts[rec_fmt] = report.format_counts.get(rec_fmt, 0) + 1
                if rec_fmt == prev_fmt:
                    fmt_runs = runs[rec_fmt]
                    if n_runs[rec_fmt] == len(fmt_runs):  # the open run is a stored one
                        fmt_runs[-1][1] = lineno
                else:
                    n_runs[rec_fmt] = n_runs.get(rec_fmt, 0) + 1
                    fmt_runs = runs.setdefault(rec_fmt, [])
                    if len(fmt_runs) < _MAX_RUNS:
                        fmt_runs.append([lineno, lineno])
                prev_fmt = rec_fmt
                if fmt is None:
                    fmt = rec_fmt
                if rec_fmt != fmt:
                    add_error(lineno, "mixed_format", f"{rec_fmt} record in a {fmt} file")
                    continue
                problems = check_record(payload, fmt)
                if problems:
                    kinds: dict[str, str] = {}  # kind -> its first detail
                    for p in problems:
                        kinds.setdefault(problem_kind(p), p.split(": ", 1)[-1])
                    for kind, detail in kinds.items():  # count every kind, list the line once
                        bad.setdefault(kind, _Bad()).add(lineno, detail)
                    if len(report.errors) < max_errors:
                        details = [p.split(": ", 1)[-1] for p in problems[:5]]
                        if len(problems) > 5:
                            details.append(f"and {len(problems) - 5} more")
                        message = "; ".join(details)
                        if len(message) > _MAX_MESSAGE_CHARS:
                            message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
                        report.errors.append(
                            LineError(line=lineno, kind=next(iter(kinds)), message=f"{message} (line {lineno})")
                        )
                    continue
                report.valid_records += 1
    except OSError as exc:
        report.reason = f"cannot read file: {exc.strerror or exc}"
        report.error_counts = {k: b.count for k, b in bad.items()}
        logger.warning("rejected %s: %s", path, report.reason)
        return report

    report.format = fmt
    report.error_counts = {k: b.count for k, b in bad.items()}
    report.bad_lines = {k: b.lines for k, b in bad.items()}
    report.bad_records = report.records - report.valid_records
    report.summary = _describe_bad(bad, runs, n_runs) if bad else None
    fraction = report.bad_fraction
    if report.records == 0:
        report.reason = f"no records: the file has only blank lines ({report.blank_lines})"
    elif report.valid_records == 0:
        if fmt:
            where = f" ({fmt} format)"
        elif set(bad) == {"unknown_format"}:
            where = " (no record in a known format)"
        else:
            where = ""
        report.reason = f"no valid records{where}: {report.summary}"
    elif fraction > max_bad_record_fraction:
        verb = "is" if report.bad_records == 1 else "are"
        report.reason = (
            f"{report.bad_records} of {report.records} records {verb} bad ({_pct(fraction, max_bad_record_fraction)}"
            f" > max_bad_record_fraction {_pct(max_bad_record_fraction, fraction)}): {report.summary}"
        )
    report.ok = report.reason is None
    if report.ok:
        logger.debug(
            "validated %s: %s, %d/%d records valid",
            path, fmt, report.valid_records, report.records,
        )
        if report.bad_records:
            logger.info(
                "%s: %d of %d records are bad and will be skipped: %s",
                path, report.bad_records, report.records, report.summary,
            )
    else:
        logger.info("rejected %s: %s", path, report.reason)
    return report


def iter_records(
    path: Path, *, max_line_bytes: int = 64 * 1024 * 1024
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for every valid record of the file's format, in order.

    The file's format is that of its first detectable record (as in :func:`validate_file`).
    Blank lines and every bad record that :func:`validate_file` counts are skipped: broken lines
    (too long, not UTF-8, not JSON, not an object), records of no or another format, and records
    that fail :func:`check_record`. Raises
    ``ValueError`` for a path that is not a regular file (symlinks are never followed) and
    ``OSError`` when it cannot be read. Meant for files that :func:`validate_file` accepted.
    """
    fh, why, _size = _open_regular(Path(path))
    if fh is None:
        raise ValueError(f"{path}: {why}")
    fmt: str | None = None
    with fh:
        for lineno, event, payload in _scan(fh, max_line_bytes):
            if event != "record":
                continue
            rec_fmt = detect_format(payload)
            if rec_fmt is None:
                continue
            if fmt is None:
                fmt = rec_fmt
            if rec_fmt != fmt or check_record(payload, fmt):
                continue
            yield lineno, payload
