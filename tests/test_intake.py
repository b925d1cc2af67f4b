"""Dropping files into inbox/: cp, mv, slow writers, ignored names, bad input."""
from __future__ import annotations

import json
import os
import time


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
