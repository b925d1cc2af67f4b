"""Tests for core.records and core.validation: real JSONL files on disk, one per case."""
from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from core.records import FORMATS, LINE_KINDS, RECORD_KINDS, check_record, detect_format, problem_kind
from core.validation import LineError, ValidationReport, iter_records, validate_file

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PC = {"prompt": "2+2=", "completion": "4"}
ALPACA = {"instruction": "Add", "input": "2 and 2", "output": "4"}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
TEXT = {"text": "The quick brown fox."}
VALID = {"messages": CHAT, "prompt_completion": PC, "alpaca": ALPACA, "sharegpt": SHAREGPT, "text": TEXT}


def write_lines(path: Path, lines: list[Any], *, end: str = "\n") -> Path:
    """Write each item as one line: dicts/lists as JSON, str as-is, bytes as raw bytes."""
    parts: list[bytes] = []
    for item in lines:
        if isinstance(item, bytes):
            parts.append(item)
        elif isinstance(item, str):
            parts.append(item.encode("utf-8"))
        else:
            parts.append(json.dumps(item).encode("utf-8"))
    path.write_bytes(b"\n".join(parts) + end.encode("utf-8"))
    return path


def kinds(record: dict, fmt: str) -> set[str]:
    return {problem_kind(p) for p in check_record(record, fmt)}


def msgs(*messages: Any) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "q"}
ASSISTANT = {"role": "assistant", "content": "a"}


# ---------------------------------------------------------------- detect_format

@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_each(fmt: str) -> None:
    assert detect_format(VALID[fmt]) == fmt


def test_detect_format_alpaca_without_input_and_unknown() -> None:
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"prompt": "x"}) is None  # completion missing
    assert detect_format({"instruction": "x"}) is None
    assert detect_format({"foo": 1}) is None
    assert detect_format({}) is None
    # first match wins, in FORMATS order
    assert detect_format({"messages": [], "text": "x"}) == "messages"


# ---------------------------------------------------------------- valid files, each format

@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_valid_file(tmp_path: Path, fmt: str) -> None:
    path = write_lines(tmp_path / f"{fmt}.jsonl", [VALID[fmt]] * 3)
    report = validate_file(path)
    assert report.ok, report.reason
    assert report.reason is None
    assert report.format == fmt
    assert (report.lines, report.blank_lines, report.records, report.valid_records) == (3, 0, 3, 3)
    assert report.error_counts == {} and report.errors == []
    assert [n for n, _ in iter_records(path)] == [1, 2, 3]
    assert all(rec == VALID[fmt] for _, rec in iter_records(path))


def test_valid_messages_variants(tmp_path: Path) -> None:
    records = [
        msgs({"role": "developer", "content": "be brief"}, USER, ASSISTANT),
        msgs({"role": "system", "content": "s"}, USER,
             {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
              "function": {"name": "f", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "1", "content": "42"},
             {"role": "assistant", "content": "It is 42.", "weight": 1}),
        msgs(USER, {"role": "assistant", "tool_calls": [{"id": "1"}]}),  # content absent is fine
        msgs({"role": "user", "content": "", "name": "bob"}, {"role": "assistant", "content": "x", "weight": 0}),
        msgs(USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}),
    ]
    for rec in records:
        assert check_record(rec, "messages") == [], rec
    report = validate_file(write_lines(tmp_path / "v.jsonl", records))
    assert report.ok and report.valid_records == len(records)


# ---------------------------------------------------------------- check_record: messages kinds

MESSAGE_CASES: list[tuple[str, dict]] = [
    ("missing_messages", {"messages_": []}),
    ("messages_not_list", {"messages": "hi"}),
    ("messages_not_list", {"messages": {"role": "user"}}),
    ("empty_messages", {"messages": []}),
    ("message_not_object", msgs("hello", ASSISTANT)),
    ("message_missing_key", msgs({"content": "no role"}, ASSISTANT)),
    ("message_missing_key", msgs(USER, {"role": "assistant"})),
    ("message_unrecognized_key", msgs({"role": "user", "content": "q", "text": "x"}, ASSISTANT)),
    ("unrecognized_role", msgs({"role": "bot", "content": "q"}, ASSISTANT)),
    ("unrecognized_role", msgs({"role": 3, "content": "q"}, ASSISTANT)),
    ("unrecognized_role", msgs({"role": "function", "content": "q"}, ASSISTANT)),
    ("missing_content", msgs(USER, {"role": "assistant", "content": None})),
    ("content_not_string", msgs({"role": "user", "content": ["a", "b"]}, ASSISTANT)),
    ("content_not_string", msgs(USER, {"role": "assistant", "content": 5})),
    ("invalid_weight", msgs(USER, {"role": "assistant", "content": "a", "weight": 0.5})),
    ("invalid_weight", msgs(USER, {"role": "assistant", "content": "a", "weight": True})),
    ("no_assistant_message", msgs(USER)),
    ("no_assistant_message", msgs({"role": "system", "content": "s"}, USER)),
    ("empty_assistant_content", msgs(USER, {"role": "assistant", "content": "  "})),
]


@pytest.mark.parametrize("kind,record", MESSAGE_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(MESSAGE_CASES)])
def test_check_record_messages_kinds(kind: str, record: dict) -> None:
    problems = check_record(record, "messages")
    assert kind in {problem_kind(p) for p in problems}, problems
    assert all(problem_kind(p) in RECORD_KINDS for p in problems)
    assert all(": " in p for p in problems)  # "kind: detail"


def test_every_messages_kind_covered() -> None:
    messages_kinds = {
        "missing_messages", "messages_not_list", "empty_messages", "message_not_object",
        "message_missing_key", "message_unrecognized_key", "unrecognized_role", "missing_content",
        "content_not_string", "invalid_weight", "no_assistant_message", "empty_assistant_content",
    }
    assert messages_kinds <= set(RECORD_KINDS)
    assert {k for k, _ in MESSAGE_CASES} == messages_kinds


def test_check_record_reports_several_problems_of_one_record() -> None:
    rec = msgs({"role": "bot", "content": 1, "extra": True})
    assert kinds(rec, "messages") == {
        "unrecognized_role", "content_not_string", "message_unrecognized_key", "no_assistant_message"
    }


# ---------------------------------------------------------------- check_record: other formats

@pytest.mark.parametrize("kind,record", [
    ("missing_conversations", {"text": "x"}),
    ("conversations_not_list", {"conversations": "x"}),
    ("empty_conversations", {"conversations": []}),
    ("turn_not_object", {"conversations": ["hi", {"from": "gpt", "value": "a"}]}),
    ("turn_missing_key", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}),
    ("turn_missing_key", {"conversations": [{"value": "q"}, {"from": "gpt", "value": "a"}]}),
    ("unrecognized_role", {"conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]}),
    ("value_not_string", {"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]}),
    ("no_assistant_message", {"conversations": [{"from": "human", "value": "q"}]}),
])
def test_check_record_sharegpt_kinds(kind: str, record: dict) -> None:
    assert kind in kinds(record, "sharegpt")


def test_sharegpt_accepts_all_documented_roles() -> None:
    roles = ["system", "human", "user", "function_call", "observation", "tool", "gpt", "assistant"]
    rec = {"conversations": [{"from": r, "value": "v"} for r in roles]}
    assert check_record(rec, "sharegpt") == []


@pytest.mark.parametrize("fmt,kind,record", [
    ("prompt_completion", "missing_field", {"prompt": "p"}),
    ("prompt_completion", "field_not_string", {"prompt": 1, "completion": "c"}),
    ("prompt_completion", "field_not_string", {"prompt": "p", "completion": ["c"]}),
    ("prompt_completion", "empty_completion", {"prompt": "p", "completion": ""}),
    ("prompt_completion", "empty_completion", {"prompt": "p", "completion": " \n"}),
    ("alpaca", "missing_field", {"output": "o"}),
    ("alpaca", "field_not_string", {"instruction": "i", "input": 3, "output": "o"}),
    ("alpaca", "field_not_string", {"instruction": None, "output": "o"}),
    ("alpaca", "empty_output", {"instruction": "i", "output": ""}),
    ("text", "missing_field", {"txt": "x"}),
    ("text", "field_not_string", {"text": 5}),
    ("text", "empty_text", {"text": ""}),
])
def test_check_record_simple_formats(fmt: str, kind: str, record: dict) -> None:
    assert kind in kinds(record, fmt)


def test_check_record_simple_formats_valid() -> None:
    assert check_record({"prompt": "", "completion": "c"}, "prompt_completion") == []  # empty prompt ok
    assert check_record({"instruction": "i", "output": "o"}, "alpaca") == []  # input optional
    assert check_record({"instruction": "i", "input": None, "output": "o"}, "alpaca") == []
    assert check_record({"instruction": "i", "input": "", "output": "o"}, "alpaca") == []


def test_check_record_unknown_format_raises() -> None:
    with pytest.raises(ValueError):
        check_record(TEXT, "csv")


# ---------------------------------------------------------------- rejections

def test_reject_directory_named_jsonl(tmp_path: Path) -> None:
    d = tmp_path / "x.jsonl"
    d.mkdir()
    report = validate_file(d)
    assert not report.ok
    assert "directory" in report.reason


def test_reject_symlink_to_valid_file(tmp_path: Path) -> None:
    target = write_lines(tmp_path / "real.jsonl", [TEXT])
    assert validate_file(target).ok
    link = tmp_path / "x.jsonl"
    link.symlink_to(target)
    report = validate_file(link)
    assert not report.ok
    assert "symlink" in report.reason
    assert report.records == 0  # nothing was read through the link
    with pytest.raises(ValueError, match="symlink"):
        list(iter_records(link))


def test_reject_dangling_symlink_and_missing_file(tmp_path: Path) -> None:
    link = tmp_path / "x.jsonl"
    link.symlink_to(tmp_path / "nowhere.jsonl")
    assert "symlink" in validate_file(link).reason
    report = validate_file(tmp_path / "missing.jsonl")
    assert not report.ok and "not found" in report.reason


def test_reject_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "x.jsonl"
    os.mkfifo(fifo)
    report = validate_file(fifo)  # would hang forever if it opened the FIFO
    assert not report.ok and "not a regular file" in report.reason


def test_reject_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"")
    report = validate_file(path)
    assert not report.ok
    assert report.reason == "empty file (0 bytes)"


def test_reject_only_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\n   \n\t\r\n  ")
    report = validate_file(path)
    assert not report.ok
    assert "only blank lines" in report.reason
    assert (report.lines, report.blank_lines, report.records) == (4, 4, 0)


def test_reject_bom_only_file(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n")
    report = validate_file(path)
    assert not report.ok and "only blank lines" in report.reason


def test_reject_invalid_utf8_with_line_number(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "u.jsonl", [TEXT, TEXT, b'{"text": "caf\xe9"}', TEXT])
    report = validate_file(path)
    assert not report.ok
    assert report.reason == (
        "1 of 4 records is bad (25 % > max_bad_record_fraction 1 %): invalid UTF-8 on line 3"
    )
    assert report.error_counts == {"invalid_utf8": 1}
    assert report.bad_lines == {"invalid_utf8": [3]} and report.bad_records == 1
    assert report.errors[0].line == 3 and report.errors[0].kind == "invalid_utf8"
    assert report.valid_records == 3
    # the trainer still never sees the broken line
    assert [n for n, _ in iter_records(path)] == [1, 2, 4]


def test_reject_invalid_json_names_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "j.jsonl", [TEXT, TEXT, '{"text": "x"', TEXT, TEXT, TEXT, "not json"])
    report = validate_file(path)
    assert not report.ok
    assert report.reason == "2 of 7 records are bad (28.6 % > max_bad_record_fraction 1 %): invalid JSON on lines 3, 7"
    assert report.error_counts == {"invalid_json": 2}
    assert report.first_error_lines() == [3, 7]


def test_reject_invalid_json_many_lines_reason_is_short(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "j.jsonl", [TEXT] + ["{"] * 50)
    report = validate_file(path)
    assert report.reason.endswith(": invalid JSON on lines 2, 3, 4, 5, 6 and 45 more")
    assert report.bad_lines["invalid_json"] == list(range(2, 22))  # the first 20 in the JSON


def test_reject_pathological_json(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    huge_int = '{"text": ' + "9" * 10_000 + "}"
    path = write_lines(tmp_path / "p.jsonl", [TEXT, deep, huge_int, '{"text": NaN}'])
    report = validate_file(path)
    assert not report.ok
    kinds_by_line = {e.line: e.kind for e in report.errors}
    assert kinds_by_line[2] == "invalid_json"
    assert kinds_by_line[3] == "invalid_json"
    assert 4 in kinds_by_line  # NaN is parsed but is not a string: schema problem


@pytest.mark.parametrize("value", ["[1, 2]", "3", '"text"', "null", "true", "[]"])
def test_reject_json_not_an_object(tmp_path: Path, value: str) -> None:
    path = write_lines(tmp_path / "o.jsonl", [TEXT, value, TEXT])
    report = validate_file(path)
    assert not report.ok
    assert report.reason.endswith("): JSON value not an object on line 2")
    assert report.error_counts == {"not_an_object": 1}


def test_reject_mixed_formats(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [CHAT, CHAT, CHAT, TEXT])
    report = validate_file(path)
    assert not report.ok
    assert report.reason == ("1 of 4 records is bad (25 % > max_bad_record_fraction 1 %): "
                             "mixed formats: messages on lines 1-3, text on line 4")
    assert report.format == "messages"
    assert report.format_counts == {"messages": 3, "text": 1}
    assert report.error_counts == {"mixed_format": 1}
    assert report.errors == [LineError(4, "mixed_format", "text record in a messages file (line 4)")]


def test_reject_mixed_formats_runs_span_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [PC, "", PC, ALPACA, PC, TEXT])
    report = validate_file(path)
    assert report.reason.endswith(
        "mixed formats: prompt_completion on lines 1-3, 5, alpaca on line 4, text on line 6"
    )


def test_reject_zero_valid_records(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "z.jsonl", [msgs(USER), msgs(USER), {"messages": []}])
    report = validate_file(path)
    assert not report.ok
    assert report.format == "messages"
    assert report.valid_records == 0 and report.records == 3
    assert report.reason.startswith("no valid records (messages format): ")
    assert "messages record without an assistant turn (lines 1, 2)" in report.reason
    assert "messages record with an empty 'messages' list (line 3)" in report.reason
    assert list(iter_records(path)) == []


def test_reject_only_unknown_format(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "k.jsonl", [{"foo": 1}, {"question": "q", "answer": "a"}])
    report = validate_file(path)
    assert not report.ok
    assert report.format is None
    assert report.error_counts == {"unknown_format": 2}
    assert "no record in a known format" in report.reason
    assert "lines 1, 2" in report.reason


def test_reject_line_too_long_without_loading_it(tmp_path: Path) -> None:
    big = json.dumps({"text": "x" * 20_000_000})
    path = write_lines(tmp_path / "big.jsonl", [TEXT, big, TEXT])
    tracemalloc.start()
    try:
        report = validate_file(path, max_line_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not report.ok
    assert report.reason.endswith("): line too long on line 2")
    assert report.errors[0].kind == "line_too_long"
    assert (report.lines, report.records, report.valid_records) == (3, 3, 2)
    assert peak < 5_000_000, peak  # the 20 MB line was never held in memory
    assert [n for n, _ in iter_records(path, max_line_bytes=1_000_000)] == [1, 3]


def test_line_length_limit_boundary(tmp_path: Path) -> None:
    line = json.dumps({"text": "abc"})  # 15 bytes
    path = write_lines(tmp_path / "edge.jsonl", [line, line], end="")
    assert validate_file(path, max_line_bytes=len(line)).ok  # exactly the limit: fine
    report = validate_file(path, max_line_bytes=len(line) - 1)
    assert report.error_counts == {"line_too_long": 2}
    assert report.lines == 2


# ---------------------------------------------------------------- record-level problems

def test_partial_invalid_file_accepted_with_counts(tmp_path: Path) -> None:
    lines = [
        CHAT,                                   # 1 ok
        msgs(USER),                             # 2 no_assistant_message
        "",                                     # 3 blank
        CHAT,                                   # 4 ok
        msgs({"role": "bot", "content": "x"}),  # 5 unrecognized_role + no_assistant_message
        {"other": 1},                           # 6 unknown_format
        CHAT,                                   # 7 ok
    ]
    path = write_lines(tmp_path / "p.jsonl", lines)
    report = validate_file(path, max_bad_record_fraction=0.5)   # 3 of 6 bad: just within
    assert report.ok, report.reason
    assert report.reason is None
    assert report.format == "messages"
    assert (report.lines, report.blank_lines, report.records, report.valid_records) == (7, 1, 6, 3)
    assert report.skipped_records == report.bad_records == 3
    assert report.error_counts == {"no_assistant_message": 2, "unrecognized_role": 1, "unknown_format": 1}
    assert report.bad_lines == {"no_assistant_message": [2, 5], "unrecognized_role": [5], "unknown_format": [6]}
    assert report.first_error_lines() == [2, 5, 6]
    assert report.errors[0].kind == "no_assistant_message"
    assert report.errors[0].message == "messages record without an assistant turn (line 2)"
    assert report.errors[1].kind == "unrecognized_role"
    assert "without an assistant turn" in report.errors[1].message
    assert report.errors[1].message.endswith("(line 5)")
    assert report.summary.startswith("messages record without an assistant turn (lines 2, 5); ")
    data = report.to_json()
    assert data["skipped_records"] == 3 and data["errors_truncated"] is False
    assert data["bad_records"] == 3 and data["bad_lines"]["unknown_format"] == [6]
    assert data["max_bad_record_fraction"] == 0.5
    assert [n for n, _ in iter_records(path)] == [1, 4, 7]
    # the same file against the default threshold (1 %) is rejected, naming every kind and line
    strict = validate_file(path)
    assert not strict.ok
    assert strict.reason.startswith(
        "3 of 6 records are bad (50 % > max_bad_record_fraction 1 %): "
        "messages record without an assistant turn (lines 2, 5); "
        "messages record whose message 0 has role 'bot' (expected ")
    assert strict.reason.endswith("match no known format (messages, prompt_completion, alpaca, "
                                  "sharegpt, text) (line 6)")


def test_iter_records_line_numbers_bom_crlf_blank_and_no_final_newline(tmp_path: Path) -> None:
    rec = [{"text": f"r{i}"} for i in range(5)]
    body = (
        b"\xef\xbb\xbf" + json.dumps(rec[0]).encode() + b"\r\n"
        + b"\r\n"
        + json.dumps(rec[1]).encode() + b"\r\n"
        + b"  \n"
        + b'{"text": ""}\n'
        + json.dumps(rec[2]).encode() + b"\n"
        + b"{broken\n"
        + json.dumps(rec[3]).encode()  # no final newline
    )
    path = tmp_path / "i.jsonl"
    path.write_bytes(body)
    assert list(iter_records(path)) == [(1, rec[0]), (3, rec[1]), (6, rec[2]), (8, rec[3])]
    report = validate_file(path)
    assert (report.lines, report.blank_lines, report.records) == (8, 2, 6)
    assert report.error_counts == {"empty_text": 1, "invalid_json": 1}


def test_bom_only_tolerated_on_line_one(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TEXT).encode() + b"\n\xef\xbb\xbf" + json.dumps(TEXT).encode())
    report = validate_file(path)
    assert report.first_error_lines() == [2]
    assert report.errors[0].kind == "invalid_json"


def test_unicode_line_separators_inside_strings_are_not_line_breaks(tmp_path: Path) -> None:
    rec = {"text": "a\u2028b\u2029c\x85d\x0ce\u00e9\U0001F600"}
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
    report = validate_file(path)
    assert report.ok and report.lines == 1
    assert list(iter_records(path)) == [(1, rec)]


def test_iter_records_uses_first_format_and_skips_others(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "f.jsonl", [{"nope": 1}, PC, TEXT, PC])
    assert [n for n, _ in iter_records(path)] == [2, 4]


# ---------------------------------------------------------------- partial acceptance

def test_few_broken_lines_accepted_under_the_threshold(tmp_path: Path) -> None:
    lines: list[Any] = [TEXT] * 200
    lines[2] = '{"text": oops'          # line 3: invalid JSON
    lines[99] = b'{"text": "caf\xe9"}'  # line 100: not UTF-8
    path = write_lines(tmp_path / "a.jsonl", lines)
    report = validate_file(path)
    assert report.ok and report.reason is None      # 2 of 200 = 1 %: not more than 1 %
    assert (report.records, report.valid_records, report.bad_records) == (200, 198, 2)
    assert report.error_counts == {"invalid_json": 1, "invalid_utf8": 1}
    assert report.bad_lines == {"invalid_json": [3], "invalid_utf8": [100]}
    assert report.summary == "invalid JSON on line 3; invalid UTF-8 on line 100"
    assert [e.line for e in report.errors] == [3, 100]
    assert report.errors[0].message.endswith("(line 3)")
    got = [n for n, _ in iter_records(path)]           # the trainer never sees the broken lines
    assert len(got) == 198 and 3 not in got and 100 not in got


def test_over_the_threshold_is_rejected_naming_kinds_lines_and_threshold(tmp_path: Path) -> None:
    lines: list[Any] = [ALPACA] * 40
    lines[2] = "{oops"
    lines[6] = {"instruction": "i", "input": "x", "output": ""}
    lines[11] = {"instruction": "i", "output": "o", "extra": 1, "input": 5}
    path = write_lines(tmp_path / "b.jsonl", lines)
    report = validate_file(path)
    assert not report.ok
    assert report.reason == (
        "3 of 40 records are bad (7.5 % > max_bad_record_fraction 1 %): invalid JSON on line 3; "
        "alpaca record with an empty 'output' (line 7); "
        "alpaca record whose 'input' is a number, not a string (line 12)"
    )
    assert validate_file(path, max_bad_record_fraction=0.075).ok      # exactly at it: accepted
    assert not validate_file(path, max_bad_record_fraction=0.07).ok


def test_zero_threshold_rejects_any_bad_record_and_bad_threshold_raises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "z.jsonl", [TEXT] * 999 + [{"text": ""}])
    assert validate_file(path).ok
    report = validate_file(path, max_bad_record_fraction=0)
    assert not report.ok
    assert report.reason == ("1 of 1000 records is bad (0.1 % > max_bad_record_fraction 0 %): "
                             "text record with an empty 'text' (line 1000)")
    for bad in (-0.1, 1, 1.5):
        with pytest.raises(ValueError, match="max_bad_record_fraction"):
            validate_file(path, max_bad_record_fraction=bad)


def test_percentages_never_read_equal_to_the_threshold(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [TEXT] * 994 + ["{"] * 6)   # 0.6 %
    report = validate_file(path, max_bad_record_fraction=0.00599)
    assert "(0.6 % > max_bad_record_fraction 0.599 %)" in report.reason


def test_a_few_records_of_another_format_are_skipped(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "m.jsonl", [PC] * 150 + [TEXT] + [PC] * 49)
    report = validate_file(path)
    assert report.ok and report.format == "prompt_completion" and report.bad_records == 1
    assert report.bad_lines == {"mixed_format": [151]}
    assert report.summary == "mixed formats: prompt_completion on lines 1-150, 152-200, text on line 151"
    assert len(list(iter_records(path))) == 199


def test_record_messages_name_format_what_is_missing_and_line(tmp_path: Path) -> None:
    assert check_record({"instruction": "i", "input": "x"}, "alpaca") == [
        "missing_field: alpaca record without 'output'"]
    assert check_record(msgs(USER), "messages") == [
        "no_assistant_message: messages record without an assistant turn"]
    assert check_record({"prompt": "p"}, "prompt_completion") == [
        "missing_field: prompt_completion record without 'completion'"]
    path = write_lines(tmp_path / "r.jsonl", [ALPACA, ALPACA, {"instruction": "i", "text": "t", "output": None}])
    report = validate_file(path)
    assert report.errors[0].message == "alpaca record whose 'output' is null, not a string (line 3)"
    path = write_lines(tmp_path / "c.jsonl", [CHAT] * 6 + [msgs(USER)])
    report = validate_file(path)
    assert report.errors[0].message == "messages record without an assistant turn (line 7)"
    assert report.reason.endswith("): messages record without an assistant turn (line 7)")


@pytest.mark.parametrize("bom,words", [
    (b"\xff\xfe", "UTF-16 text (BOM FF FE): convert to UTF-8"),
    (b"\xfe\xff", "UTF-16 text (BOM FE FF): convert to UTF-8"),
    (b"\xff\xfe\x00\x00", "UTF-32 text (BOM FF FE 00 00): convert to UTF-8"),
])
def test_utf16_and_utf32_with_bom_are_named(tmp_path: Path, bom: bytes, words: str) -> None:
    codec = {b"\xff\xfe": "utf-16-le", b"\xfe\xff": "utf-16-be"}.get(bom, "utf-32-le")
    path = tmp_path / "w.jsonl"
    path.write_bytes(bom + (json.dumps(TEXT) + "\n").encode(codec) * 3)
    report = validate_file(path)
    assert not report.ok
    assert report.reason.startswith(words), report.reason


@pytest.mark.parametrize("codec,order", [("utf-16-le", "little-endian"), ("utf-16-be", "big-endian")])
def test_utf16_without_bom_is_named(tmp_path: Path, codec: str, order: str) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes((json.dumps(TEXT) + "\n").encode(codec) * 3)
    report = validate_file(path)
    assert not report.ok
    assert report.reason.startswith(f"UTF-16 text ({order}, no BOM"), report.reason
    assert "convert to UTF-8" in report.reason


def test_cancel_stops_a_long_pass(tmp_path: Path) -> None:
    from core.validation import ValidationCancelled

    path = tmp_path / "long.jsonl"
    path.write_bytes((json.dumps(TEXT) + "\n").encode() * 50_000)
    calls = []
    with pytest.raises(ValidationCancelled):
        validate_file(path, cancel=lambda: calls.append(1) or len(calls) >= 3)
    assert len(calls) == 3
    assert validate_file(path, cancel=lambda: False).ok


# ---------------------------------------------------------------- report plumbing

def test_to_json_round_trips(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.jsonl", [CHAT, msgs(USER), "[1]", TEXT])
    report = validate_file(path)
    data = report.to_json()
    text = json.dumps(data)
    assert json.loads(text) == data
    for key in ("path", "ok", "reason", "format", "lines", "blank_lines", "records",
                "valid_records", "error_counts", "errors"):
        assert key in data
    assert data["errors"][0] == {"line": 2, "kind": "no_assistant_message",
                                 "message": data["errors"][0]["message"]}
    assert ValidationReport.from_json(json.loads(text)) == report


def test_max_errors_caps_list_but_counts_stay_complete(tmp_path: Path) -> None:
    lines: list[Any] = [CHAT]
    for i in range(30):
        lines.append(msgs(USER) if i % 2 else {"messages": "x"})
    path = write_lines(tmp_path / "c.jsonl", lines)
    report = validate_file(path, max_errors=4, max_bad_record_fraction=0.99)
    assert report.ok
    assert report.first_error_lines() == [2, 3, 4, 5]
    assert report.error_counts == {"messages_not_list": 15, "no_assistant_message": 15}
    assert report.records - report.valid_records == 30
    assert report.to_json()["errors_truncated"] is True
    full = validate_file(path, max_errors=1000, max_bad_record_fraction=0.99)
    assert len(full.errors) == 30 and full.error_counts == report.error_counts


def test_max_errors_zero_and_file_level_counts(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", [TEXT] + ["{"] * 10)
    report = validate_file(path, max_errors=0)
    assert report.errors == [] and report.error_counts == {"invalid_json": 10}
    assert report.reason.endswith("): invalid JSON on lines 2, 3, 4, 5, 6 and 5 more")
    assert report.bad_lines == {"invalid_json": list(range(2, 12))}


def test_kind_lists_are_disjoint_snake_case() -> None:
    assert not set(LINE_KINDS) & set(RECORD_KINDS)
    for kind in (*LINE_KINDS, *RECORD_KINDS):
        assert kind == kind.lower() and " " not in kind and kind.replace("_", "").isalnum()


# ---------------------------------------------------------------- streaming

def test_large_file_is_streamed_fast_and_exact(tmp_path: Path) -> None:
    n = 200_000
    line = json.dumps(CHAT).encode() + b"\n"
    bad = json.dumps(msgs(USER)).encode() + b"\n"
    path = tmp_path / "large.jsonl"
    with path.open("wb") as fh:
        for i in range(n):
            fh.write(bad if i % 1000 == 999 else line)
    start = time.perf_counter()
    report = validate_file(path)
    elapsed = time.perf_counter() - start
    assert report.ok
    assert (report.lines, report.records, report.valid_records) == (n, n, n - 200)
    assert report.error_counts == {"no_assistant_message": 200}
    assert report.first_error_lines()[:2] == [1000, 2000]
    assert elapsed < 3.0, f"validating {n} lines took {elapsed:.2f}s"  # generous: ~0.5 s here


def test_memory_bounded_on_many_lines(tmp_path: Path) -> None:
    path = tmp_path / "mem.jsonl"
    rec = json.dumps({"text": "y" * 1000}).encode() + b"\n"
    path.write_bytes(rec * 20_000)  # ~20 MB
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_records(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20_000
    assert peak < 2_000_000, peak  # far below the file size: nothing accumulates
