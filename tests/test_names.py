"""File names: letters of any script are kept (NFC), a leading dash never reaches a command line,
the hints the queue prints work as printed, and the CLI takes a file's original name too."""
from __future__ import annotations

import json
import os
import shlex
import unicodedata

from daemon.intakefile import safe_name
from daemon_helpers import text_records, write_jsonl


def test_safe_name_keeps_letters_and_drops_only_what_is_unsafe() -> None:
    assert safe_name("données_✓.jsonl") == "données.jsonl"
    assert safe_name(unicodedata.normalize("NFD", "données.jsonl")) == "données.jsonl"   # one form
    assert safe_name("日本語 データ.jsonl") == "日本語_データ.jsonl"
    assert safe_name("-rf.jsonl") == "rf.jsonl" and safe_name("--.jsonl") == "dataset.jsonl"
    assert safe_name("../../etc/ÉTÉ;rm -rf.jsonl") == "ÉTÉ_rm_-rf.jsonl"
    assert safe_name("a$(b)`c`.jsonl") == "a_b_c.jsonl"
    long = safe_name("日" * 300 + ".jsonl")                        # 3 bytes a letter
    assert len(long.encode()) <= 190 and long.endswith(".jsonl") and set(long[:-6]) == {"日"}


def test_the_duplicate_hint_works_as_printed_and_the_original_name_is_known(home) -> None:
    home.write_config(standin_step_seconds=0, inbox_stable_seconds=0)
    inbox = home.path / "inbox"
    records = text_records(3, "same")
    write_jsonl(inbox / "a.jsonl", records)
    os.utime(inbox / "a.jsonl", (1_000_000, 1_000_000))
    write_jsonl(inbox / "-rf données_✓.jsonl", records)             # the same content, a hostile name
    r = home.burst(timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert home.files("done") == ["a.jsonl"] and home.files("failed") == ["rf_données.jsonl"]
    reason = home.error("rf_données.jsonl")["reason"]
    hint = reason.split("`")[1]
    assert hint == "trainer-ctl queue retry rf_données.jsonl --force", reason
    r = home.ctl(*shlex.split(hint)[1:])                              # exactly as printed
    assert r.returncode == 0, r.stderr
    assert home.files("pending") == ["rf_données.jsonl"]
    # the name the file arrived with finds it too
    r = home.ctl("queue", "show", "--json", "--", "-rf données_✓.jsonl")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "rf_données.jsonl"
