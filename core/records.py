"""The record formats of a JSONL training file: what a line and a record are (stdlib only).

A line is blank, broken (too long, not UTF-8, not JSON, not a JSON object: :data:`LINE_KINDS`,
see :func:`scan_lines`) or one record. A record's format comes from its keys
(:func:`detect_format`, one of :data:`FORMATS`); :func:`check_record` lists what is wrong with it
read as a given format (:data:`RECORD_KINDS`); :func:`describe_bad` puts a file's bad records
in words. Whole files are validated in :mod:`core.validation`.

The schema checks follow the OpenAI cookbook's chat-data checker (data type, missing messages
list, message missing key, unrecognized key, unrecognized role, missing content, no assistant
message).

Problems returned by :func:`check_record` are strings ``"kind: detail"``; ``kind`` (the part
before the first colon, see :func:`problem_kind`) is a stable snake_case name listed in
:data:`RECORD_KINDS`; the detail names the format and what is wrong ("alpaca record without
'output'"). Line-level kinds are in :data:`LINE_KINDS`.
"""
from __future__ import annotations

import json
from typing import Any, BinaryIO, Iterator

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

#: The line-level kinds in words, as a rejection reason names them.
KIND_TEXT = {
    "line_too_long": "line too long",
    "invalid_utf8": "invalid UTF-8",
    "invalid_json": "invalid JSON",
    "not_an_object": "JSON value not an object",
}

_BOM = b"\xef\xbb\xbf"
_DISCARD_CHUNK = 1 << 20  # bytes read at a time while skipping the rest of an overlong line
_REASON_LINES = 5  # line numbers named per problem in a reason
_BAD_LINES = 20  # line numbers kept per kind (a report's ``bad_lines``)


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


def unknown_format_detail(record: dict) -> str:
    """The detail of an ``unknown_format`` problem: the record's first keys, and the formats."""
    keys = ", ".join(_short(str(k), 30) for k in list(record)[:8])
    return f"record whose keys [{keys}] match no known format ({', '.join(FORMATS)})"


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


# One scanned line: (line number, event, payload)
#   event "blank":  payload None
#   event "error":  payload (kind, message)
#   event "record": payload dict
Scanned = tuple[int, str, Any]


def scan_lines(fh: BinaryIO, max_line_bytes: int) -> Iterator[Scanned]:
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


# ---- the bad records of a file in words (a rejection reason, a report's summary)

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


class BadRecords:
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


def describe_bad(bad: dict[str, BadRecords], runs: dict[str, list[list[int]]], n_runs: dict[str, int]) -> str:
    """The bad records in words, each kind once, in the order of its first line."""
    parts: list[str] = []
    for kind, b in sorted(bad.items(), key=lambda kv: kv[1].lines[0] if kv[1].lines else 0):
        if kind == "mixed_format":
            parts.append("mixed formats: " + ", ".join(
                f"{name} on {_runs_text(runs[name], n_runs[name])}" for name in runs))
        elif kind in KIND_TEXT:
            parts.append(f"{KIND_TEXT[kind]} on {_line_list(b.lines, b.count)}")
        elif b.same or b.count == 1:
            parts.append(f"{b.detail} ({_line_list(b.lines, b.count)})")
        else:  # the same kind with other details elsewhere: name the first, count them all
            parts.append(f"{b.detail} (line {b.lines[0]}; {b.count} records with {kind} on "
                         f"{_line_list(b.lines, b.count)})")
    return "; ".join(parts)
