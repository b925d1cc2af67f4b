"""Dropping files into inbox/: cp, mv, slow writers, ignored names, bad input."""
from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest

from daemon_helpers import text_records, wait_for, write_jsonl


def test_cp_and_mv_files_are_trained(home, tmp_path):
    home.launch()
    write_jsonl(home.path / "inbox/copied.jsonl", text_records(3, "a"))        # written in place
    src = write_jsonl(tmp_path / "moved.jsonl", text_records(4, "b"))
    os.rename(src, home.path / "inbox/moved.jsonl")                             # renamed in
    wait_for(lambda: home.files("done") == ["copied.jsonl", "moved.jsonl"], what="both done")
    assert home.files("pending") == home.files("processing") == home.files("failed") == []
    assert os.listdir(home.path / "inbox") == []
    jobs = {j["name"]: j for j in json.loads(home.ctl("queue", "list", "--json").stdout)}
    assert jobs["copied.jsonl"]["records"] == 3 and jobs["moved.jsonl"]["steps"] == 4
    assert len(jobs["moved.jsonl"]["sha256"]) == 64


def test_slow_writer_is_not_taken_until_complete(home):
    home.write_config(inbox_stable_seconds=1.0)
    home.launch()
    path = home.path / "inbox/slow.jsonl"
    with open(path, "w") as fh:
        for i in range(8):                      # a line every 0.3 s: never stable for 1 s
            fh.write(json.dumps({"text": f"line {i}"}) + "\n")
            fh.flush()
            time.sleep(0.3)
            assert path.exists(), "taken while still being written"
    wait_for(lambda: home.files("done") == ["slow.jsonl"], what="slow file done")
    job = json.loads(home.ctl("queue", "list", "--json").stdout)[0]
    assert job["records"] == 8


def test_ignored_names_stay_in_inbox_and_non_jsonl_is_logged_once(home):
    home.launch()
    inbox = home.path / "inbox"
    for name in (".hidden.jsonl", "x.jsonl.tmp", "y.jsonl.part", "notes.txt"):
        write_jsonl(inbox / name, text_records(1))
    write_jsonl(inbox / "real.jsonl", text_records(1))
    wait_for(lambda: home.files("done") == ["real.jsonl"], what="real file done")
    time.sleep(1.5)   # past a rescan
    assert sorted(os.listdir(inbox)) == [".hidden.jsonl", "notes.txt", "x.jsonl.tmp", "y.jsonl.part"]
    assert home.log_text().count("ignoring notes.txt") == 1


BAD = {
    "empty.jsonl": (b"", "empty file", []),
    "badjson.jsonl": (b'{"text": "ok"}\n{"text": oops}\n{"text": "ok"}\n', "invalid JSON", [2]),
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "UTF-8", [2]),
    "notobject.jsonl": (b'{"text": "ok"}\n[1, 2, 3]\n', "not an object", [2]),
    "blank.jsonl": (b"\n   \n\n", "blank", []),
    "novalid.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}]}\n{"foo": 1}\n', "no valid records", []),
    "utf16.jsonl": ('{"text": "ok"}\n'.encode("utf-16"), "UTF-16 text (BOM FF FE): convert to UTF-8", []),
    "alpaca.jsonl": (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n',
                     "alpaca record with an empty 'output' (line 2)", [2]),
}


def test_each_bad_input_lands_in_failed_with_reason_and_lines(home, tmp_path):
    inbox = home.path / "inbox"
    for name, (data, _, _) in BAD.items():
        (inbox / name).write_bytes(data)
    (inbox / "adir.jsonl").mkdir()
    target = write_jsonl(tmp_path / "target.jsonl", text_records(2))
    (inbox / "link.jsonl").symlink_to(target)
    write_jsonl(inbox / "good.jsonl", text_records(2))
    r = home.burst()
    assert r.returncode == 0, r.stderr
    assert home.files("done") == ["good.jsonl"]
    assert home.files("failed") == sorted([*BAD, "adir.jsonl", "link.jsonl"])
    for name, (_, words, lines) in BAD.items():
        err = home.error(name)
        assert words.lower() in err["reason"].lower(), (name, err["reason"])
        got = [e["line"] for e in err["validation"]["errors"]]
        assert got[: len(lines)] == lines, (name, err)
    assert "directory" in home.error("adir.jsonl")["reason"]
    assert "symbolic link" in home.error("link.jsonl")["reason"]
    assert (home.path / "queue/failed/link.jsonl").is_symlink() and target.exists()   # link moved, not followed
    assert os.listdir(inbox) == []
    st = home.status()
    assert st["queue"]["failed"] == len(BAD) + 2 and st["queue"]["done"] == 1


def test_daemon_keeps_running_after_bad_input(home):
    home.launch()
    (home.path / "inbox/bad.jsonl").write_bytes(b"\xff\xfe garbage\n")
    wait_for(lambda: home.files("failed") == ["bad.jsonl"], what="bad file rejected")
    write_jsonl(home.path / "inbox/good.jsonl", text_records(2))
    wait_for(lambda: home.files("done") == ["good.jsonl"], what="later good file done")


def test_same_content_twice_is_not_trained_twice_unless_forced(home, tmp_path):
    write_jsonl(home.path / "inbox/first.jsonl", text_records(3, "same"))
    assert home.burst().returncode == 0
    write_jsonl(home.path / "inbox/again.jsonl", text_records(3, "same"))
    assert home.burst().returncode == 0
    err = home.error("again.jsonl")
    assert "duplicate" in err["reason"] and err["duplicate_of"] == 1
    jobs = {j["name"]: j for j in json.loads(home.ctl("queue", "list", "--json").stdout)}
    assert jobs["again.jsonl"]["duplicate_of"] == jobs["first.jsonl"]["id"]
    r = home.ctl("queue", "retry", "again.jsonl")
    assert r.returncode == 1 and "--force" in r.stderr
    r = home.ctl("queue", "retry", "again.jsonl", "--force")
    assert r.returncode == 0, r.stderr
    assert home.burst().returncode == 0
    assert home.files("done") == ["again.jsonl", "first.jsonl"]
    assert not (home.path / "queue/failed/again.jsonl.error.json").exists()
    # queue add --force straight in
    src = write_jsonl(tmp_path / "third.jsonl", text_records(3, "same"))
    assert home.ctl("queue", "add", str(src)).returncode == 1
    assert home.ctl("queue", "add", str(src), "--force").returncode == 0


def test_same_name_twice_keeps_both_files(home):
    write_jsonl(home.path / "inbox/data.jsonl", text_records(2, "one"))
    assert home.burst().returncode == 0
    write_jsonl(home.path / "inbox/data.jsonl", text_records(2, "two"))
    assert home.burst().returncode == 0
    assert home.files("done") == ["data.2.jsonl", "data.jsonl"]


def _with_bad(n_good: int, bad_lines: dict[int, bytes]) -> bytes:
    lines = [json.dumps({"text": f"r{i}"}).encode() for i in range(n_good + len(bad_lines))]
    for line, data in bad_lines.items():
        lines[line - 1] = data
    return b"\n".join(lines) + b"\n"


def test_a_few_bad_lines_are_skipped_and_the_threshold_is_configurable(home):
    inbox = home.path / "inbox"
    (inbox / "few.jsonl").write_bytes(_with_bad(199, {7: b'{"text": oops'}))          # 0.5 %: accepted
    (inbox / "many.jsonl").write_bytes(_with_bad(95, {3: b"{", 9: b"[1]", 20: b'{"x": 1}',
                                                      30: b'{"text": ""}', 41: b'{"text": 5}'}))  # 5 %
    assert home.burst().returncode == 0
    assert home.files("done") == ["few.jsonl"] and home.files("failed") == ["many.jsonl"]
    jobs = {j["name"]: j for j in json.loads(home.ctl("queue", "list", "--json").stdout)}
    assert jobs["few.jsonl"]["records"] == 199 and jobs["few.jsonl"]["steps"] == 199
    err = home.error("many.jsonl")
    assert err["reason"] == (
        "5 of 100 records are bad (5 % > max_bad_record_fraction 1 %): invalid JSON on line 3; "
        "JSON value not an object on line 9; record whose keys ['x'] match no known format (messages, "
        "prompt_completion, alpaca, sharegpt, text) (line 20); text record with an empty 'text' (line 30); "
        "text record whose 'text' is a number, not a string (line 41)")
    v = err["validation"]
    assert v["bad_records"] == 5 and v["max_bad_record_fraction"] == 0.01
    assert v["bad_lines"] == {"invalid_json": [3], "not_an_object": [9], "unknown_format": [20],
                              "empty_text": [30], "field_not_string": [41]}
    with sqlite3.connect(home.path / "status/state.db") as db:
        accepted = [m for (m,) in db.execute("SELECT message FROM events WHERE kind = 'accepted'")]
    assert accepted == ["few.jsonl queued as few.jsonl (199 records, text, priority normal; "
                        "1 bad record skipped: invalid JSON on line 7)"]
    # a higher threshold in config.json: the retry takes it (no daemon running: done directly)
    home.write_config(max_bad_record_fraction=0.05)
    r = home.ctl("queue", "retry", "many.jsonl")
    assert r.returncode == 0, r.stderr
    assert home.burst().returncode == 0
    assert home.files("done") == ["few.jsonl", "many.jsonl"]
    jobs = {j["name"]: j for j in json.loads(home.ctl("queue", "list", "--json").stdout)}
    assert jobs["many.jsonl"]["records"] == jobs["many.jsonl"]["steps"] == 95
    # and at intake by the daemon
    (inbox / "more.jsonl").write_bytes(_with_bad(95, {1: b"{", 2: b"{", 3: b"{", 4: b"{", 5: b"{"}))
    assert home.burst().returncode == 0
    assert "more.jsonl" in home.files("done")


def test_max_bad_record_fraction_is_validated(home):
    from core.config import ConfigError, parse_config

    assert parse_config({}).max_bad_record_fraction == 0.01
    assert parse_config({"max_bad_record_fraction": 0}).max_bad_record_fraction == 0
    for bad in (1, 1.5, -0.01, "x"):
        with pytest.raises(ConfigError, match="max_bad_record_fraction"):
            parse_config({"max_bad_record_fraction": bad})
